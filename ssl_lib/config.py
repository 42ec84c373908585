"""The pipeline's parameters: validated once, at load, into plain typed objects.

``params.yaml`` is the single source of truth. Every key is checked here before any compute runs:
an unknown key, a wrong type, an unknown method or an impossible label budget gives one clear
message that names the key and what is allowed.

The defaults below are params.yaml's values (``tests/test_defaults.py`` checks every key): a key left out of
params.yaml keeps the default run's recipe.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from ssl_lib.errors import UNKNOWN_KEY, ConfigError, format_validation_errors

SOURCES = ("fashion-mnist", "digits", "folder")


def _not_a_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"Input should be a number, not a boolean (got {value!r})")
    return value


# A float param takes what YAML writes for a number (an int, a float, or PyYAML's string for `1e-3`), never a
# boolean: `lr: true` is a mistake, not 1.0.
Number = Annotated[float, Field(strict=False), BeforeValidator(_not_a_bool)]


class _Section(BaseModel):
    # forbid: a typo such as `pretrain.epoch` must fail loudly, not be silently ignored. strict: an int param takes
    # an integer and a bool param a boolean, never each other (`pretrain.epochs=true` is not 1 epoch), nor a string
    # or a fractional number; float params are Number.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DataParams(_Section):
    source: Literal["fashion-mnist", "digits", "folder"] = "fashion-mnist"
    path: str | None = None
    labels_per_class: int | None = Field(default=10, ge=1)
    label_fraction: Number | None = Field(default=None, gt=0.0, le=1.0)
    val_per_class: int = Field(default=10, ge=0)
    test_fraction: Number = Field(default=0.2, gt=0.0, lt=1.0)
    # folder: the size images are resized to, one int (square) or [height, width]; null = the most common size,
    # scaled down to a longer side of at most 64 px (ssl_lib.sizing.fit_image_size): a folder of photos must not
    # train a CPU model on 4000-pixel images. A pair comes from YAML as a list: the pair is lax, its sides strict.
    image_size: int | Annotated[tuple[StrictInt, StrictInt], Field(strict=False)] | None = None
    # Decoding processes for a folder source; None = one per core. Not a dependency of ingest (dvc.yaml): the
    # output is the same with any number.
    workers: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_label_budget(self) -> DataParams:
        if (self.labels_per_class is None) == (self.label_fraction is None):
            raise ValueError(
                "set exactly one of data.labels_per_class and data.label_fraction (the other must be null)"
            )
        if self.source == "folder" and not self.path:
            raise ValueError("data.source 'folder' needs data.path: a folder with one sub-folder of images per class")
        if self.image_size is not None:
            if self.source != "folder":
                raise ValueError(f"data.image_size only applies to data.source 'folder' ({self.source!r} has a "
                                 "fixed size): set it to null")
            sides = (self.image_size,) if isinstance(self.image_size, int) else self.image_size
            if any(side < 4 for side in sides):
                raise ValueError(f"data.image_size must be at least 4 pixels a side, got {self.image_size}")
        return self


class PseudoLabelParams(_Section):
    preview_count: int = Field(default=32, ge=1, le=256)


# The default run's method options (docs/tuning.md "How the defaults were chosen"); each method's own Options keep the
# defaults of its paper or library.
DEFAULT_METHOD_OPTIONS: dict[str, dict[str, Any]] = {"simclr": {"temperature": 0.3, "crop_scale_min": 0.4}}


class PretrainParams(_Section):
    method: str = "simclr"
    backbone: str = "convnet"
    # Compute, not passes (ssl_lib.sizing): images seen in all of pretraining; the passes over the pool follow
    # from its size, at most max_epochs. An explicit epochs overrides the budget.
    images_seen: int = Field(default=300_000, ge=1)
    max_epochs: int = Field(default=100, ge=1)
    epochs: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=128, ge=2)
    lr: Number = Field(default=3e-3, gt=0)
    weight_decay: Number = Field(default=1e-4, ge=0)
    max_images: int | None = Field(default=None, ge=2)
    device: str = "auto"
    # Hyper-parameters per method, keyed by method name, so switching `method` picks that method's own
    # options (or its defaults): {simclr: {temperature: 0.3}, rotation: {...}}. Each method's mapping is
    # checked against its typed `Options` (ssl_lib.methods) and kept as the options the user set. The default
    # is the default run's (params.yaml's): a pretrain.options that is given replaces it whole, as any value
    # replaces its default.
    options: dict[str, dict[str, Any]] = Field(default_factory=lambda: copy.deepcopy(DEFAULT_METHOD_OPTIONS))
    # Engine (ssl_lib.acceleration, ssl_lib.batches, ssl_lib.checkpoint, ssl_lib.distributed).
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool | Literal["auto"] = "auto"
    compile: bool | Literal["auto"] = "auto"
    data_placement: Literal["auto", "device", "stream"] = "auto"
    checkpoint_every: int = Field(default=200, ge=0)
    devices: int = Field(default=1, ge=1)
    nodes: int = Field(default=1, ge=1)

    @property
    def world_size(self) -> int:
        return self.devices * self.nodes

    def method_options(self) -> dict[str, Any]:
        """The options set for the selected method (validated; the method fills in its defaults)."""
        return dict(self.options.get(self.method) or {})

    @field_validator("options")
    @classmethod
    def _valid_options(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        # Validating through one model with a field per method makes pydantic report each problem at its
        # full key (pretrain.options.simclr.temperature), next to any other bad key in the file.
        validated = _options_by_method().model_validate(value)
        # Only what was set, in the order given (coerced, e.g. 1 -> 1.0): settings and run fingerprints stay
        # as before, and the defaults live in one place, the method's Options.
        return {name: {key: getattr(getattr(validated, name), key) for key in given} for name, given in value.items()}

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        from ssl_lib.methods import METHODS

        if value not in METHODS:
            raise ValueError(f"unknown method {value!r}; known methods: {', '.join(sorted(METHODS))}")
        return value

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        from ssl_lib.models.backbones import BACKBONES

        if value not in BACKBONES:
            raise ValueError(f"unknown backbone {value!r}; known backbones: {', '.join(BACKBONES)}")
        return value

    @model_validator(mode="after")
    def _method_requirements(self) -> PretrainParams:
        from ssl_lib.methods import get_method

        method = get_method(self.method)
        if self.batch_size % self.world_size:
            raise ValueError(f"pretrain.batch_size {self.batch_size} must be divisible by devices x nodes "
                             f"({self.world_size}): each process takes an equal share of every batch")
        required = method.required_backbone
        if required and self.backbone != required:
            raise ValueError(f"method {self.method!r} needs pretrain.backbone={required!r} (got {self.backbone!r})")
        return self


_OPTIONS_MODELS: dict[tuple[tuple[str, type], ...], type[BaseModel]] = {}


def _options_by_method() -> type[BaseModel]:
    """A model with one optional field per registered method, typed as that method's ``Options``."""
    from pydantic import create_model

    from ssl_lib.methods import METHODS

    # Keyed by the registry's contents: a method registered later (a plugin, a test) gets a new model.
    key = tuple(sorted(METHODS.items()))
    if key not in _OPTIONS_MODELS:
        fields: dict[str, Any] = {name: (cls.Options | None, None) for name, cls in key}
        _OPTIONS_MODELS[key] = create_model("MethodOptionsByName", __config__=ConfigDict(extra="forbid"), **fields)
    return _OPTIONS_MODELS[key]


class FinetuneParams(_Section):
    mode: Literal["full", "linear"] = "full"
    epochs: int = Field(default=100, ge=1)
    # >= 2 as train_classifier demands (BatchNorm needs two images a batch): caught here, before any compute.
    batch_size: int = Field(default=64, ge=2)
    lr: Number = Field(default=2e-3, gt=0)
    weight_decay: Number = Field(default=5e-4, ge=0)
    augment: bool = True
    encoder_lr_mult: Number = Field(default=1.0, gt=0)
    head_init: Literal["random", "prototype"] = "prototype"
    lp_epochs: int = Field(default=50, ge=0)
    lp_lr: Number = Field(default=1e-2, gt=0)
    baseline_epochs: int | None = Field(default=None, ge=1)
    baseline_lr: Number | None = Field(default=None, gt=0)
    device: str = "auto"
    registered_model_name: str = Field(default="ssl-pipeline-classifier", min_length=1)


SELF_TRAIN_METHODS = ("none", "label_propagation", "distill", "fixmatch")


class SelfTrainParams(_Section):
    # One method, or a list applied in order within each round (propagated labels seeding a FixMatch student).
    method: str | list[str] = "label_propagation"
    rounds: int = Field(default=2, ge=0)
    # Compute, not passes (ssl_lib.sizing): pool images seen in all rounds and methods together; the passes
    # per method and round follow from the pool's size, at most max_epochs. An explicit epochs overrides it.
    images_seen: int = Field(default=240_000, ge=1)
    max_epochs: Number = Field(default=40.0, gt=0)
    epochs: Number | None = Field(default=None, gt=0)
    batch_size: int = Field(default=256, ge=2)
    labeled_batch_size: int = Field(default=64, ge=1)
    lr: Number = Field(default=4e-3, gt=0)
    weight_decay: Number = Field(default=5e-4, ge=0)
    unlabeled_weight: Number = Field(default=1.0, ge=0)
    ema_decay: Number = Field(default=0.99, ge=0, lt=1)
    threshold: Number = Field(default=0.95, gt=0, le=1)
    distribution_alignment: bool = True
    temperature: Number = Field(default=1.0, gt=0)
    knn_k: int = Field(default=10, ge=1)
    alpha: Number = Field(default=0.99, gt=0, lt=1)
    balance: bool = True
    whiten: bool = True
    bn_recalibration: int = Field(default=40, ge=0)
    # The final model is the last round unless an earlier candidate leads it on val by more than this (README
    # "The final model"): val is small and noisy, and the later candidates learned from more of the data.
    selection_margin: Number = Field(default=0.03, ge=0, lt=1)
    device: str = "auto"

    @field_validator("method")
    @classmethod
    def _known_methods(cls, value: str | list[str]) -> str | list[str]:
        steps = [value] if isinstance(value, str) else list(value)
        unknown = [m for m in steps if m not in SELF_TRAIN_METHODS]
        if unknown or not steps:
            raise ValueError(f"unknown self_train method {unknown or value!r}; use one of "
                             f"{', '.join(SELF_TRAIN_METHODS)} or a list of them (except none)")
        if "none" in steps and len(steps) > 1:
            raise ValueError("self_train.method 'none' cannot be combined with other methods")
        return value

    @property
    def steps(self) -> tuple[str, ...]:
        """The methods applied in each round; empty for none."""
        steps = (self.method,) if isinstance(self.method, str) else tuple(self.method)
        return () if steps == ("none",) else steps


class EvaluateParams(_Section):
    knn_k: int = Field(default=20, ge=1)
    # The champion rule (docs/architecture.md): a new model version takes the `champion` alias when its test accuracy
    # beats the champion's, on the same test split, by more than this.
    champion_margin: Number = Field(default=0.005, ge=0, lt=1)


class PlanParams(_Section):
    # A wall-clock budget for the whole run, in minutes: `sslpipe run` scales the pretraining and self-training
    # budgets down to fit it before any compute (ssl_lib.plan), from a timed probe of the real steps. No stage
    # reads this section: the scaled budgets are what the run records and DVC tracks.
    budget_minutes: Number | None = Field(default=None, gt=0)
    probe: bool = True  # time a few real steps to estimate minutes per stage (off: steps only)


class PipelineParams(_Section):
    seed: int = Field(default=0, ge=0)
    # Factories, not instances: building PretrainParams() here would import the method registry (and torch)
    # with this module, and every process that only reads params would pay for it.
    data: DataParams = Field(default_factory=DataParams)
    pseudo_labels: PseudoLabelParams = Field(default_factory=PseudoLabelParams)
    pretrain: PretrainParams = Field(default_factory=PretrainParams)
    finetune: FinetuneParams = Field(default_factory=FinetuneParams)
    self_train: SelfTrainParams = Field(default_factory=SelfTrainParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    plan: PlanParams = Field(default_factory=PlanParams)


def _unknown_key_message(loc: tuple[Any, ...]) -> str:
    """An unknown key in params.yaml, with the method names or options allowed under pretrain.options."""
    if loc[:2] == ("pretrain", "options"):
        from ssl_lib.methods import METHODS

        if len(loc) == 3:
            return f"unknown method; pretrain.options is keyed by method name, allowed: {', '.join(sorted(METHODS))}"
        if len(loc) == 4 and loc[2] in METHODS:
            allowed = ", ".join(sorted(METHODS[loc[2]].Options.model_fields)) or "(none)"
            return f"unknown option of method {loc[2]!r}; allowed: {allowed}"
    return UNKNOWN_KEY


def parse_params(raw: dict[str, Any], origin: str = "params.yaml") -> PipelineParams:
    """Validate a raw params mapping; raise ConfigError with every problem listed."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin} must be a YAML mapping of sections (seed, data, pretrain, ...)")
    try:
        return PipelineParams.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_errors(err, origin, unknown_key=_unknown_key_message)) from None


def read_raw_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found; run from the project root or pass the path to params.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    return raw


def load_params(path: str | Path = "params.yaml") -> PipelineParams:
    """Read and validate params.yaml."""
    return parse_params(read_raw_params(path), origin=str(path))


def load_data_params(path: str | Path = "params.yaml") -> DataParams:
    """Read and validate params.yaml's data section alone: cheap (no method registry, no torch) for a process
    that needs nothing else, such as the fingerprint stage that runs on every `dvc repro`."""
    raw = read_raw_params(path)
    section = raw.get("data", {}) if isinstance(raw, dict) else None
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: data must be a mapping (source, path, labels_per_class, ...)")
    try:
        return DataParams.model_validate(section)
    except ValidationError as err:
        raise ConfigError(format_validation_errors(err, str(path), loc_prefix=("data",),
                                                   unknown_key=_unknown_key_message)) from None


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``a.b=value``; the value is read as YAML so numbers, booleans and null keep their type."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like key.path=value, e.g. pretrain.method=simclr")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key, parsed


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``raw`` with dotted-key overrides applied (validation happens afterwards)."""
    result = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        node = result
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {dotted!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return result
