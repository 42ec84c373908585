"""The contract every self-supervised method follows, and the registry that finds them by name.

A method owns the encoder plus whatever heads its objective needs, and turns a batch of images
(float in [0, 1]) into a scalar loss. Everything random about the objective that should be
fixed before training - pretext labels, augmentation seeds - comes from ``make_pseudo_labels``,
so that the pseudo-label artefact alone pins down the run's randomness.

Pseudo-label arrays follow one convention that ``ssl_lib.pretrain`` relies on:

* ``epoch_seed``: int64, shape (epochs,). The seed of the torch.Generator that shuffles the
  data and draws augmentations in that epoch.
* any other key: shape (epochs, num_images). Per-sample targets; ``loss`` receives the slice
  for the current epoch and batch as ``targets[key]`` (a tensor of shape (B,)).
"""
from __future__ import annotations

import numbers
import sys
from abc import abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, ForwardRef, Generic, TypeVar, cast, get_args, get_origin

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator
from torch import nn

from ssl_lib.errors import UNKNOWN_KEY, ConfigError, MethodRequirementError, format_validation_errors
from ssl_lib.models.vit import default_patch_size

FAMILIES = ("pretext", "contrastive", "non-contrastive", "generative")

METHODS: dict[str, type[SSLMethod]] = {}

_M = TypeVar("_M", bound=type["SSLMethod"])


class UnknownMethodError(ConfigError):
    """Raised for a method name that is not registered; the message lists the known ones."""


class MethodOptions(BaseModel):
    """Base of every method's ``Options``: typed, bounded hyper-parameters with their defaults.

    A subclass declares each option as a field, ``temperature: float = Field(0.2, gt=0, description=...)``;
    the description is what the README's option table shows (``ssl_lib.methods.options_table``).
    """

    # forbid: a misspelt option must fail, not silently train with the default; frozen: the options a
    # model was built with cannot drift from what its heads were sized for.
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _strict_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """As params are (ssl_lib.config): a boolean is no number (`temperature: true` is not 1.0), and an int
        option takes an integer (not 2.5, nor "3"); a float option still takes an int or YAML's `1e-3`."""
        annotation = cls.model_fields[info.field_name].annotation if info.field_name else None
        types = set(get_args(annotation)) | {annotation}
        if isinstance(value, bool) and bool not in types:
            raise ValueError(f"Input should be a number, not a boolean (got {value!r})")
        if types & {int} and not types & {float, str} and not isinstance(value, (numbers.Integral, type(None))):
            raise ValueError(f"Input should be a valid integer (got {value!r})")
        return value


# What ``resolve_options`` (and so the constructor, previews) accepts: a mapping of set options, a ready
# ``Options`` instance, or None for the defaults.
OptionsArg = Mapping[str, Any] | MethodOptions | None

OptionsT = TypeVar("OptionsT", bound=MethodOptions)


class SSLMethod(nn.Module, Generic[OptionsT]):
    """Base class: an encoder plus the heads and loss of one self-supervised objective.

    The encoder maps images in [0, 1] (normalization is the encoder's business, see
    ``ssl_lib.pretrain``) to (B, feature_dim) features. Subclasses set ``name``, ``family`` and
    ``Options`` (a ``MethodOptions`` subclass), and implement ``loss``; ``self.options`` is an instance
    of their ``Options``.

    A method is generic in its options, ``class Rotation(SSLMethod["Rotation.Options"])`` with a nested
    ``class Options(MethodOptions)``, so that ``self.options`` and ``resolve_options`` are typed as its own
    ``Options``. The type argument and the ``Options`` class attribute (which the code reads at run time) are
    checked to agree when the class is defined.
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    #: The backbone the method drives (e.g. ``"vit_tiny"`` for token-level methods), or None for any.
    #: Class-level so that params validation can check ``pretrain.backbone`` without building a model.
    required_backbone: ClassVar[str | None] = None
    #: The number of image channels the method needs (3 for colorization), or None for any. Class-level
    #: so that ingest can reject a dataset before any work; ``check_data`` raises the full message.
    required_channels: ClassVar[int | None] = None

    options: OptionsT

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declared = _declared_options(cls)
        if declared is not None and not (isinstance(cls.Options, type) and issubclass(cls.Options, declared)):
            raise TypeError(f"{cls.__qualname__}.Options is {cls.Options.__qualname__}, but the class is declared "
                            f"generic in {declared.__qualname__}: make the two the same class")

    def __init__(self, encoder: nn.Module, feature_dim: int, in_channels: int, image_size: int,
                 **options: Any) -> None:
        super().__init__()
        self.encoder = encoder
        self.feature_dim = feature_dim
        self.in_channels = in_channels
        self.image_size = image_size
        self.options = self.resolve_options(options)
        # Diagnostics of the latest loss call (e.g. collapse monitors) as detached 0-d tensors;
        # kept as tensors so that reading them does not force a device sync on every step.
        self.last_stats: dict[str, torch.Tensor] = {}

    @classmethod
    def resolve_options(cls, options: OptionsArg = None) -> OptionsT:
        """``options`` over the defaults, as an instance of ``cls.Options``; a ready ``cls.Options`` is returned as
        it is, and an instance of any other options class raises TypeError.

        An unknown, mistyped or out-of-range option raises ConfigError naming
        ``pretrain.options.<method>.<option>`` and what is allowed.
        """
        if isinstance(options, MethodOptions):
            resolved = options
        else:
            try:
                resolved = cls.Options.model_validate(dict(options or {}))
            except ValidationError as err:
                # Worded as a bad params.yaml is (ssl_lib.config words it the same way).
                raise ConfigError(format_validation_errors(err, f"the options of method {cls.name!r}",
                                                           loc_prefix=("pretrain", "options", cls.name),
                                                           unknown_key=cls._unknown_option_message)) from None
        if type(resolved) is not cls.Options:
            raise TypeError(f"method {cls.name or cls.__qualname__!r} takes a mapping of options or a "
                            f"{cls.Options.__qualname__}, not a {type(resolved).__qualname__}")
        # cls.Options is the class OptionsT stands for: __init_subclass__ checked it as the class was defined.
        return cast(OptionsT, resolved)

    @classmethod
    def _unknown_option_message(cls, loc: tuple[Any, ...]) -> str:
        if len(loc) != 4:  # pretrain.options.<method>.<option>
            return UNKNOWN_KEY
        allowed = ", ".join(sorted(cls.Options.model_fields)) or "(none)"
        return f"unknown option of method {cls.name!r}; allowed: {allowed}"

    @abstractmethod
    def loss(self, images: torch.Tensor, targets: dict[str, torch.Tensor],
             generator: torch.Generator) -> torch.Tensor:
        """Scalar loss of a batch. ``images``: float (B, C, H, W) in [0, 1], un-normalized."""
        raise NotImplementedError

    @classmethod
    def check_data(cls, in_channels: int, image_size: int | None = None) -> None:
        """Raise MethodRequirementError (naming the data that fit) if the method cannot train on such images.

        Callable without a model, before any work (the pseudo_labels stage). Here: a vit_tiny method needs
        patches that tile the image (``ssl_lib.models.vit.default_patch_size``).
        """
        if cls.required_backbone != "vit_tiny" or image_size is None:
            return
        try:
            default_patch_size(image_size)
        except ValueError:
            raise MethodRequirementError(
                f"method {cls.name} trains a vit_tiny, whose 4- or 7-pixel patches must tile the image, but the "
                f"images are {image_size} pixels wide: use images whose side is a multiple of 4 or 7 (28, 32, "
                f"64, ...), or a method that trains a convnet") from None

    def forward(self, images: torch.Tensor, targets: dict[str, torch.Tensor],
                generator: torch.Generator) -> torch.Tensor:
        """``loss``: calling the module is what DistributedDataParallel hooks its gradient sync into."""
        return self.loss(images, targets, generator)

    def after_step(self, step: int, total_steps: int) -> None:
        """Called by ``ssl_lib.pretrain`` right after each optimizer step; ``step`` counts from 0 over the
        whole run (``total_steps`` steps). Momentum/EMA methods update their target networks here. No-op."""

    @classmethod
    def make_pseudo_labels(cls, num_images: int, epochs: int, seed: int) -> dict[str, np.ndarray]:
        """Deterministic pseudo labels for the whole run. The base class only makes ``epoch_seed``."""
        rng = np.random.default_rng([seed, 0x55AA])
        return {"epoch_seed": rng.integers(0, 2**62, size=epochs, dtype=np.int64)}

    @classmethod
    def preview_pairs(cls, images_uint8: np.ndarray, pseudo: dict[str, np.ndarray],
                      count: int, options: OptionsArg = None) -> list[tuple[np.ndarray, str]]:
        """(image HWC uint8, caption) pairs that show what the method trains on, for a preview grid."""
        return [(np.asarray(images_uint8[i]), f"#{i}") for i in range(min(count, len(images_uint8)))]


def _declared_options(cls: type) -> type | None:
    """The options class that ``cls`` is generic in: X of the nearest ``SSLMethod[X]`` (or subclass ``[X]``) among
    the bases of ``cls`` and its ancestors, a type variable's bound; None when there is none."""
    for owner in cls.__mro__:
        for base in owner.__dict__.get("__orig_bases__", ()):
            origin = get_origin(base)
            if not (isinstance(origin, type) and issubclass(origin, SSLMethod)):
                continue
            (arg,) = get_args(base)
            if isinstance(arg, TypeVar):
                arg = arg.__bound__
            if isinstance(arg, (str, ForwardRef)):  # "Rotation.Options": the class, then its attributes
                first, *rest = (arg if isinstance(arg, str) else arg.__forward_arg__).split(".")
                arg = owner if first == owner.__name__ else vars(sys.modules[owner.__module__])[first]
                for attribute in rest:
                    arg = getattr(arg, attribute)
            return arg if isinstance(arg, type) else None
    return None


def register(cls: _M) -> _M:
    """Class decorator: add a method to ``METHODS`` under its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute 'name'")
    if cls.family not in FAMILIES:
        raise ValueError(f"{cls.__name__}.family must be one of {FAMILIES}, got {cls.family!r}")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is already registered by {METHODS[cls.name].__name__}")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[SSLMethod]:
    """Look a method up by name; unknown names raise UnknownMethodError listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(sorted(METHODS)) or "(none registered - import ssl_lib.methods)"
        raise UnknownMethodError(f"unknown SSL method {name!r}; known methods: {known}") from None

