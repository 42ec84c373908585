"""Self-supervised pretraining loop.

The (sub)set lives on the device as one uint8 tensor; batches are gathered from it by index and
augmented there, batched (as in airbench), so no DataLoader workers compete for the CPU.
All randomness derives from ``settings.seed``: model init directly, data order and augmentation
through the per-epoch seeds in the pseudo labels. Two CPU runs give the identical loss sequence.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ssl_lib.augment import nhwc_to_tensor
from ssl_lib.device import select_device
from ssl_lib.io import atomic_path
from ssl_lib.methods import get_method
from ssl_lib.models.backbones import NormalizedEncoder, build_backbone


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
    options: dict = field(default_factory=dict)  # method options, checked against default_options
    optimizer: str = "adamw"  # "adamw" or "sgd" (nesterov, momentum 0.9)
    warmup_fraction: float = 0.05  # of all steps: linear warm-up, then cosine decay to 0


@dataclass
class PretrainResult:
    encoder_state: dict[str, torch.Tensor]  # plain CPU state_dict of the bare encoder
    feature_dim: int
    history: list[dict[str, Any]]  # per epoch: epoch, loss, images_per_sec, seconds, lr, method stats
    step_losses: list[float] = field(default_factory=list)
    subset: np.ndarray | None = None  # indices into the input images that were trained on


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
    for ax, (image, caption) in zip(axes.ravel(), pairs):
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


def _check_pseudo(pseudo: dict[str, np.ndarray], epochs: int, n: int) -> None:
    if "epoch_seed" not in pseudo or np.shape(pseudo["epoch_seed"]) != (epochs,):
        raise ValueError(f"pseudo labels need 'epoch_seed' of shape ({epochs},); "
                         "make them with make_pseudo_labels(settings, num_images)")
    for key, value in pseudo.items():
        if key != "epoch_seed" and np.shape(value) != (epochs, n):
            raise ValueError(f"pseudo label {key!r} has shape {np.shape(value)}, expected ({epochs}, {n}) "
                             "for these settings; were they made with different epochs/max_images?")


def _optimizer(model: nn.Module, settings: PretrainSettings) -> torch.optim.Optimizer:
    # No weight decay on BatchNorm and bias parameters: decaying them only fights the normalization.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=settings.lr)
    if settings.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=settings.lr, momentum=0.9, nesterov=True)
    raise ValueError(f"unknown optimizer {settings.optimizer!r}; use 'adamw' or 'sgd'")


def warmup_cosine(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over the first ``warmup_fraction`` of steps, then cosine to 0."""
    warmup = max(1, int(round(total_steps * warmup_fraction)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def pretrain(images: np.ndarray, mean: list[float], std: list[float], pseudo: dict[str, np.ndarray],
             settings: PretrainSettings, on_epoch: Callable[[dict[str, Any]], None] | None = None,
             progress: bool = True) -> PretrainResult:
    """Pretrain ``settings.backbone`` with ``settings.method`` on uint8 NHWC ``images``.

    ``mean``/``std`` (per channel, on the [0, 1] scale) normalize inside the model. ``pseudo``
    comes from ``make_pseudo_labels(settings, len(images))``. Returns the bare encoder's weights.
    """
    from tqdm.auto import tqdm

    method_cls = get_method(settings.method)
    options = method_cls.resolve_options(settings.options)  # fail on a bad option before any work
    if settings.epochs < 1 or settings.batch_size < 2:
        raise ValueError(f"need epochs >= 1 and batch_size >= 2, got {settings.epochs} and {settings.batch_size}")
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 NHWC, got {images.dtype} with shape {images.shape}")
    subset = subset_indices(len(images), settings)
    n = len(subset)
    _check_pseudo(pseudo, settings.epochs, n)
    device = select_device(settings.device)

    data = nhwc_to_tensor(images[subset], device)
    channels, size = int(data.shape[1]), int(data.shape[2])
    # Seed model init without leaving the global RNG changed for the caller.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        encoder, feature_dim = build_backbone(settings.backbone, channels, size)
        model = method_cls(NormalizedEncoder(encoder, mean, std), feature_dim, channels, size, **options)
    model.to(device=device, memory_format=torch.channels_last)

    batch_size = min(settings.batch_size, n)
    # Drop the ragged last batch: a tiny batch gives BatchNorm and contrastive losses noisy statistics.
    steps_per_epoch = max(1, n // batch_size)
    total_steps = steps_per_epoch * settings.epochs
    optimizer = _optimizer(model, settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, settings.warmup_fraction))

    per_sample = {k: torch.as_tensor(np.asarray(v)) for k, v in pseudo.items() if k != "epoch_seed"}
    history: list[dict[str, Any]] = []
    step_losses: list[float] = []
    bar = tqdm(total=total_steps, disable=not progress, desc=f"pretrain {settings.method}", unit="step")
    model.train()
    try:
        for epoch in range(settings.epochs):
            generator = torch.Generator().manual_seed(int(pseudo["epoch_seed"][epoch]))
            order = torch.randperm(n, generator=generator)
            epoch_losses: list[torch.Tensor] = []
            epoch_stats: dict[str, list[torch.Tensor]] = {}
            start = time.perf_counter()
            for step in range(steps_per_epoch):
                idx = order[step * batch_size:(step + 1) * batch_size]
                batch = data[idx.to(device)].float().div_(255.0)
                targets = {k: v[epoch, idx].to(device) for k, v in per_sample.items()}
                loss = model.loss(batch, targets, generator)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                model.after_step(epoch * steps_per_epoch + step, total_steps)
                scheduler.step()
                epoch_losses.append(loss.detach())
                for key, value in model.last_stats.items():
                    epoch_stats.setdefault(key, []).append(value.detach())
                bar.update(1)
                if progress and (step % 10 == 0 or step == steps_per_epoch - 1):
                    elapsed = time.perf_counter() - start
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}",
                                    img_s=f"{(step + 1) * batch_size / max(elapsed, 1e-9):.0f}")
            losses = torch.stack(epoch_losses).float().cpu()
            seconds = time.perf_counter() - start
            step_losses += losses.tolist()
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "loss": float(losses.mean()),
                "images_per_sec": steps_per_epoch * batch_size / max(seconds, 1e-9),
                "seconds": seconds,
                "lr": float(scheduler.get_last_lr()[0]),
            }
            for key, values in epoch_stats.items():
                record[key] = float(torch.stack(values).float().mean())
            history.append(record)
            if on_epoch is not None:
                on_epoch(record)
    finally:
        bar.close()

    state = {k: v.detach().cpu().contiguous().clone() for k, v in encoder.state_dict().items()}
    return PretrainResult(encoder_state=state, feature_dim=feature_dim, history=history,
                          step_losses=step_losses, subset=subset)
