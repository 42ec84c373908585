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

from abc import abstractmethod
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from torch import nn

FAMILIES = ("pretext", "contrastive", "non-contrastive", "generative")

METHODS: dict[str, type["SSLMethod"]] = {}

_M = TypeVar("_M", bound=type["SSLMethod"])


class UnknownMethodError(ValueError):
    """Raised for a method name that is not registered; the message lists the known ones."""


class SSLMethod(nn.Module):
    """Base class: an encoder plus the heads and loss of one self-supervised objective.

    The encoder maps images in [0, 1] (normalization is the encoder's business, see
    ``ssl_lib.pretrain``) to (B, feature_dim) features. Subclasses set ``name``, ``family``,
    ``default_options`` and implement ``loss``.
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    default_options: ClassVar[dict[str, Any]] = {}

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
    def resolve_options(cls, options: dict[str, Any] | None) -> dict[str, Any]:
        """Merge ``options`` over ``default_options``; an unknown key raises ValueError naming it."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(cls.default_options))
        if unknown:
            allowed = ", ".join(sorted(cls.default_options)) or "(none)"
            raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))} for method {cls.name!r}; "
                             f"allowed options: {allowed}")
        return {**cls.default_options, **options}

    @abstractmethod
    def loss(self, images: torch.Tensor, targets: dict[str, torch.Tensor],
             generator: torch.Generator) -> torch.Tensor:
        """Scalar loss of a batch. ``images``: float (B, C, H, W) in [0, 1], un-normalized."""
        raise NotImplementedError

    @classmethod
    def check_data(cls, in_channels: int, image_size: int | None = None) -> None:
        """Raise ValueError (naming the data that fit) if the method cannot train on such images. No-op."""

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
                      count: int, options: dict[str, Any] | None = None) -> list[tuple[np.ndarray, str]]:
        """(image HWC uint8, caption) pairs that show what the method trains on, for a preview grid."""
        return [(np.asarray(images_uint8[i]), f"#{i}") for i in range(min(count, len(images_uint8)))]


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

