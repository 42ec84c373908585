"""What a pretraining run is, decided before its first step: its settings (from the params), the images it trains on,
and its pseudo-labels (pretext targets and per-epoch seeds). Their preview is drawn by ``ssl_lib.previews``.

The pseudo_labels stage needs exactly this and none of the training engine (``ssl_lib.pretrain``), so the
two stay apart and editing the engine does not rerun pseudo_labels.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ssl_lib.methods import get_method
from ssl_lib.sizing import pretrain_size

if TYPE_CHECKING:
    from ssl_lib.config import PipelineParams


# kw_only and no defaults where params.yaml has the value: the run's settings come from its params (from_params),
# and a caller that builds them by hand says every one. The defaults left are the recipe's, not params.
@dataclass(frozen=True, kw_only=True)
class PretrainSettings:
    method: str
    backbone: str
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    seed: int
    max_images: int | None
    device: str
    options: dict  # method options, checked against the method's Options
    optimizer: str = "adamw"  # "adamw" or "sgd" (nesterov, momentum 0.9)
    warmup_fraction: float = 0.05  # of all steps: linear warm-up, then cosine decay to 0
    precision: str  # auto | fp32 | bf16 | fp16 (see ssl_lib.acceleration)
    channels_last: bool | None  # None = decide per device
    compile: bool | None  # torch.compile the encoder; None = decide per device
    data_placement: str  # auto | device | stream (see ssl_lib.batches)
    checkpoint_every: int  # optimizer steps between resumable checkpoints; 0 = none

    @classmethod
    def from_params(cls, params: PipelineParams, num_images: int) -> PretrainSettings:
        """Pretraining's settings for ``num_images`` prepared pool images: the batch and the passes sized to the
        pool (``ssl_lib.sizing``) from the image budget, unless ``pretrain.epochs`` is set."""
        p = params.pretrain
        size = pretrain_size(pretraining_pool_size(num_images, p.max_images), p.batch_size, p.epochs, p.images_seen,
                             p.max_epochs, p.world_size)
        return cls(method=p.method, backbone=p.backbone, epochs=int(size.epochs), batch_size=size.batch_size,
                   lr=p.lr, weight_decay=p.weight_decay, seed=params.seed, max_images=p.max_images, device=p.device,
                   options=p.method_options(), precision=p.precision,
                   channels_last=None if p.channels_last == "auto" else p.channels_last,
                   compile=None if p.compile == "auto" else p.compile, data_placement=p.data_placement,
                   checkpoint_every=p.checkpoint_every)

    def trajectory(self) -> dict[str, Any]:
        """The settings that determine the weights (not where data live or how often they are saved)."""
        values = asdict(self)
        for key in ("device", "data_placement", "checkpoint_every"):
            values.pop(key)
        return values


def pretraining_pool_size(num_images: int, max_images: int | None) -> int:
    """How many of ``num_images`` pretraining trains on: all, or ``max_images`` of them."""
    return num_images if max_images is None else min(num_images, max_images)


def subset_indices(num_images: int, settings: PretrainSettings) -> np.ndarray:
    """Indices of the images pretraining uses: all, or a seeded random ``max_images`` of them (sorted)."""
    if settings.max_images is None or settings.max_images >= num_images:
        return np.arange(num_images)
    if settings.max_images < 1:
        raise ValueError(f"max_images must be >= 1 or None, got {settings.max_images}")
    rng = np.random.default_rng([settings.seed, 0x5B5E7])
    return np.sort(rng.choice(num_images, size=settings.max_images, replace=False))


def make_pseudo_labels(settings: PretrainSettings, num_images: int) -> dict[str, np.ndarray]:
    """Pseudo labels for a run over ``num_images`` input images (arrays are indexed within the subset)."""
    n = len(subset_indices(num_images, settings))
    return get_method(settings.method).make_pseudo_labels(n, settings.epochs, settings.seed)
