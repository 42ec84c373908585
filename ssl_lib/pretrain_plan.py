"""What a pretraining run is, decided before its first step: its settings, the images it trains on, and its
pseudo-labels (pretext targets and per-epoch seeds), with a preview of them.

The pseudo_labels stage needs exactly this and none of the training engine (``ssl_lib.pretrain``), so the
two stay apart and editing the engine does not rerun pseudo_labels.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ssl_lib.io import atomic_path
from ssl_lib.methods import get_method


@dataclass(frozen=True)
class PretrainSettings:
    method: str
    backbone: str
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    seed: int
    max_images: int | None
    device: str = "auto"
    options: dict = field(default_factory=dict)  # method options, checked against the method's Options
    optimizer: str = "adamw"  # "adamw" or "sgd" (nesterov, momentum 0.9)
    warmup_fraction: float = 0.05  # of all steps: linear warm-up, then cosine decay to 0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (see ssl_lib.acceleration)
    channels_last: bool | None = None  # None = decide per device
    compile: bool | None = None  # torch.compile the encoder; None = decide per device
    data_placement: str = "auto"  # auto | device | stream (see ssl_lib.batches)
    checkpoint_every: int = 0  # optimizer steps between resumable checkpoints; 0 = none

    def trajectory(self) -> dict[str, Any]:
        """The settings that determine the weights (not where data live or how often they are saved)."""
        values = asdict(self)
        for key in ("device", "data_placement", "checkpoint_every"):
            values.pop(key)
        return values


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


def save_preview(method_name: str, images_uint8: np.ndarray, pseudo: dict[str, np.ndarray],
                 path: str | Path, count: int = 32, options: dict[str, Any] | None = None) -> None:
    """Write a PNG grid of what ``method_name`` trains on. ``images_uint8`` must be aligned with
    ``pseudo`` (i.e. the pretraining subset, in order)."""
    import matplotlib

    matplotlib.use("Agg")  # here, not at import: importing this module must not change global state
    import matplotlib.pyplot as plt

    pairs = get_method(method_name).preview_pairs(np.asarray(images_uint8), pseudo, count, options)
    cols = 8
    rows = max(1, math.ceil(len(pairs) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.3, rows * 1.5), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (image, caption) in zip(axes.ravel(), pairs, strict=False):
        image = np.asarray(image)
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255)
        ax.set_title(caption, fontsize=7)
    fig.suptitle(f"{method_name}: training inputs", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
