"""The deployable classifier (normalization + encoder + linear head) and its supervised training.

``train_classifier`` fine-tunes a pretrained encoder (mode "full" or "linear") and, with a
random-init encoder and mode "full", also trains the supervised-from-scratch baseline, so the
two are compared under the same loop, augmentation and model selection. Its phases, LP-FT's linear probe and the
training proper, are one loop (``_fit``); their settings come from the params (``FinetuneSettings.from_params``).
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ssl_lib.acceleration import keep_freed_memory
from ssl_lib.augment import nhwc_to_tensor, random_resized_crop, shift_flip
from ssl_lib.device import select_device
from ssl_lib.errors import TrainingDiverged
from ssl_lib.models.backbones import build_backbone
from ssl_lib.optim import decay_groups, warmup_cosine_schedule
from ssl_lib.progress import progress_bar
from ssl_lib.sizing import shift_px
from ssl_lib.timing import Laps

if TYPE_CHECKING:
    from ssl_lib.config import PipelineParams

MODES = ("full", "linear")


class Classifier(nn.Module):
    """Images in [0, 1] -> logits. Mean/std are buffers so the model is self-contained when loaded
    from a registry: callers never need to know the training normalization."""

    mean: torch.Tensor  # buffers (register_buffer in __init__)
    std: torch.Tensor

    def __init__(self, encoder: nn.Module, feature_dim: int, num_classes: int, mean: list[float],
                 std: list[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"mean and std need one entry per channel and std > 0, got {mean} and {std}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.encoder = encoder
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim
        self.num_classes = num_classes

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder features (B, D) of float images (B, C, H, W) in [0, 1]."""
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_classifier(backbone: str, in_channels: int, image_size: int, num_classes: int, mean: list[float],
                     std: list[float], encoder_state: dict[str, torch.Tensor] | None = None,
                     seed: int = 0) -> Classifier:
    """A Classifier whose encoder is random-init (seeded by ``seed``) or loaded from ``encoder_state``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder, feature_dim = build_backbone(backbone, in_channels, image_size)
        model = Classifier(encoder, feature_dim, num_classes, mean, std)
    if encoder_state is not None:
        encoder.load_state_dict(encoder_state)
    return model


# What build_classifier needs to rebuild a saved Classifier (the finetune and self_train stages' JSON hold them).
SPEC_KEYS = ("backbone", "in_channels", "image_size", "num_classes", "mean", "std")


def classifier_spec(info: Mapping[str, Any]) -> dict[str, Any]:
    """The ``build_classifier`` arguments (``SPEC_KEYS``) of a saved classifier's description."""
    return {k: info[k] for k in SPEC_KEYS}


def load_classifier(spec: Mapping[str, Any], path: str | Path) -> Classifier:
    """A Classifier of ``spec`` (``classifier_spec``) with the state_dict saved at ``path``, on the CPU; its mode
    is build_classifier's (training): callers that only predict call ``.eval()``."""
    model = build_classifier(**spec)
    model.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
    return model


# kw_only and no defaults where params.yaml has the value: the run's settings come from its params (from_params),
# and a caller that builds them by hand says every one. The defaults left are the recipe's, not params.
@dataclass(frozen=True, kw_only=True)
class FinetuneSettings:
    mode: str  # "full": train everything; "linear": frozen encoder (BatchNorm in eval), train the head
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    seed: int
    augment: bool  # random shift + horizontal flip, batched
    device: str
    encoder_lr_mult: float  # full mode: < 1 moves a pretrained encoder slower than the head
    max_shift_px: int  # the shift's largest step; ssl_lib.sizing.shift_px sizes it to the images
    label_smoothing: float = 0.0
    warmup_fraction: float = 0.05
    # With augment: also a random resized crop (area in [crop_scale_min, 1]) with probability crop_p;
    # crop_p = 0 keeps the plain shift + flip.
    crop_p: float = 0.0
    crop_scale_min: float = 0.5
    # Head initialisation: "random" (nn.Linear default) or "prototype": the nearest-class-mean
    # classifier of the (un-augmented) training features, W_c = mu_c / s, b_c = -|mu_c|^2 / (2 s^2)
    # with s the mean feature norm, so training starts from the class prototypes.
    head_init: str
    # LP-FT (Kumar et al., 2022): first train only the head on the frozen encoder (BatchNorm in eval)
    # for lp_epochs at lp_lr, then run the normal schedule. 0 = off.
    lp_epochs: int
    lp_lr: float

    @classmethod
    def from_params(cls, params: PipelineParams, image_size: int, baseline: bool = False) -> FinetuneSettings:
        """The SSL model's fine-tuning on images of ``image_size``, or the supervised-only baseline's training.

        The baseline trains a random-init encoder at the full learning rate with a random head: LP-FT and a
        prototype head need features worth keeping, and measured on Fashion-MNIST they did not help it.
        Its epochs default to the SSL model's lp_epochs + epochs, the same number of passes over the labels.
        """
        f = params.finetune
        common: dict[str, Any] = dict(batch_size=f.batch_size, weight_decay=f.weight_decay, seed=params.seed,
                                      augment=f.augment, device=f.device, max_shift_px=shift_px(image_size),
                                      lp_lr=f.lp_lr)
        if baseline:
            return cls(mode="full", epochs=f.baseline_epochs or f.epochs + f.lp_epochs, lr=f.baseline_lr or f.lr,
                       encoder_lr_mult=1.0, head_init="random", lp_epochs=0, **common)
        return cls(mode=f.mode, epochs=f.epochs, lr=f.lr, encoder_lr_mult=f.encoder_lr_mult, head_init=f.head_init,
                   lp_epochs=f.lp_epochs, **common)


HEAD_INITS = ("random", "prototype")
# Where an epoch's time goes (ssl_lib.timing), history columns <phase>_seconds: gathering and augmenting the
# batches; the steps; the val images (and keeping a new best epoch's weights); the rest (the loss read back).
PHASES = ("data", "step", "eval", "other")


def _augment(x: torch.Tensor, generator: torch.Generator, settings: FinetuneSettings) -> torch.Tensor:
    if not settings.augment:
        return x
    if settings.crop_p > 0:
        n = x.shape[0]
        cropped = random_resized_crop(x, generator, (settings.crop_scale_min, 1.0), flip_p=0.0)
        use = (torch.rand(n, generator=generator, device=generator.device) < settings.crop_p).to(x.device)
        x = torch.where(use.view(-1, 1, 1, 1), cropped, x)
    return shift_flip(x, generator, settings.max_shift_px)


def _prototype_init(model: Classifier, x_train: torch.Tensor, y_train: torch.Tensor) -> None:
    """Set the head to the nearest-class-mean classifier of the training features."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        feats = torch.cat([model.features(x_train[i:i + 512].float().div(255.0)) for i in range(0, len(x_train), 512)])
        scale = feats.norm(dim=1).mean().clamp_min(1e-6)
        feats = feats / scale
        weight = torch.zeros_like(model.head.weight)
        for c in range(model.num_classes):
            mask = y_train == c
            if bool(mask.any()):
                weight[c] = feats[mask].mean(0)
        # logits = f.mu/s - |mu|^2/2 (f in units of s): argmax = nearest class mean.
        model.head.weight.copy_(weight / scale)
        model.head.bias.copy_(-0.5 * (weight ** 2).sum(1))
    model.train(was_training)


@dataclass(frozen=True)
class _Phase:
    """One supervised phase of ``train_classifier``: the linear probe (LP-FT's first part) or the training proper."""

    name: str  # in a divergence's message: "linear-probe" or "fine-tuning"
    epochs: int
    lr: float  # the base learning rate, named in a divergence's message
    warmup_fraction: float
    min_warmup: int
    # The encoder out of training: in eval mode (BatchNorm statistics do not drift either) and out of the graph.
    frozen_encoder: bool


def _fit(model: Classifier, x_train: torch.Tensor, y_train: torch.Tensor, optimizer: torch.optim.Optimizer,
         phase: _Phase, settings: FinetuneSettings, generator: torch.Generator,
         val: tuple[torch.Tensor, torch.Tensor] | None = None,
         on_val: Callable[[dict[str, Any]], None] | None = None,
         on_epoch: Callable[[dict[str, Any]], None] | None = None, progress: str | None = None) -> None:
    """The supervised loop: ``phase.epochs`` passes over the uint8 images ``x_train`` in a seeded order, each batch of
    ``settings.batch_size`` augmented and one ``optimizer`` step on the cross entropy of the head's logits, the
    learning rate warmed up then cosine-decayed over all steps. A diverged epoch raises TrainingDiverged.

    With ``on_epoch``, each epoch's row (epoch, train_loss, train_acc; val_loss and val_acc with ``val``, then
    ``on_val`` sees the row; seconds and where they went) goes to it. Measuring draws no random numbers, so the
    trained weights are the same with or without it. ``progress``: the progress bar's title; None: no bar.
    """
    device = x_train.device
    n = len(x_train)
    batch_size = min(settings.batch_size, n)
    steps_per_epoch = math.ceil(n / batch_size)
    total = steps_per_epoch * phase.epochs
    scheduler = warmup_cosine_schedule(optimizer, total, phase.warmup_fraction, min_warmup=phase.min_warmup)
    laps = Laps(device, PHASES)
    bar = progress_bar(range(phase.epochs), enabled=progress is not None, desc=progress, unit="epoch")
    try:
        for epoch in bar:
            start = time.perf_counter()
            laps.start()
            model.train()
            if phase.frozen_encoder:
                model.encoder.eval()
            order = torch.randperm(n, generator=generator).to(device)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            step_losses: list[torch.Tensor] = []
            for step in range(steps_per_epoch):
                idx = order[step * batch_size:(step + 1) * batch_size]
                if len(idx) < 2 and not phase.frozen_encoder:
                    continue  # a single-sample batch breaks BatchNorm in train mode
                x = _augment(x_train[idx].float().div_(255.0), generator, settings)
                laps.lap("data")
                if phase.frozen_encoder:
                    with torch.no_grad():
                        feats = model.features(x)
                    logits = model.head(feats)
                else:
                    logits = model(x)
                loss = F.cross_entropy(logits, y_train[idx], label_smoothing=settings.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_sum += loss.detach() * len(idx)
                correct += (logits.argmax(1) == y_train[idx]).sum()
                step_losses.append(loss.detach())
                laps.lap("step")
            _check_finite(loss_sum, step_losses, phase.name, epoch * steps_per_epoch, total, phase.lr)
            if on_epoch is None:
                laps.totals()  # not recorded: start the next epoch's over
                continue
            record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": float(loss_sum) / n,
                                      "train_acc": int(correct) / n}
            laps.lap("other")
            if val is not None:
                record["val_loss"], record["val_acc"] = _evaluate(model, *val)
                if on_val is not None:
                    on_val(record)
            laps.lap("eval")  # the val images, and what on_val does (keeping a new best epoch's weights)
            record["seconds"] = time.perf_counter() - start
            record.update(laps.columns())
            if progress is not None:
                bar.set_postfix(loss=f"{record['train_loss']:.3f}", refresh=False,
                                val_acc=f"{record.get('val_acc', float('nan')):.3f}")
            on_epoch(record)
    finally:
        bar.close()


def _check_finite(loss_sum: torch.Tensor, step_losses: list[torch.Tensor], phase: str, steps_before: int,
                  total: int, lr: float) -> None:
    """Raise TrainingDiverged if an epoch's loss is not finite, naming its first such step.

    One look at the epoch's sum (a NaN or infinite step makes it so), once per epoch: no extra wait for the
    device on every step. ``steps_before``: the steps of the earlier epochs. The caller knows which param set
    ``lr`` (the SSL model's or the baseline's) and names it.
    """
    if bool(torch.isfinite(loss_sum)):
        return
    losses = torch.stack(step_losses).cpu()
    bad = torch.nonzero(~torch.isfinite(losses)).flatten().tolist()
    first = bad[0] if bad else len(losses) - 1  # finite steps whose sum overflowed: name the epoch's last
    raise TrainingDiverged.at(phase, steps_before + first + 1, total, float(losses[first]), lr, None)


def _evaluate(model: Classifier, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> tuple[float, float]:
    model.eval()
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            logits = model(x[i:i + batch_size].float().div_(255.0))
            loss_sum += float(F.cross_entropy(logits, y[i:i + batch_size], reduction="sum"))
            correct += int((logits.argmax(1) == y[i:i + batch_size]).sum())
    return loss_sum / len(x), correct / len(x)


def train_classifier(model: Classifier, train_images: np.ndarray, train_labels: np.ndarray,
                     val_images: np.ndarray | None, val_labels: np.ndarray | None, settings: FinetuneSettings,
                     on_epoch: Callable[[dict[str, Any]], None] | None = None,
                     progress: bool = True,
                     on_lp_epoch: Callable[[dict[str, Any]], None] | None = None
                     ) -> tuple[Classifier, list[dict[str, Any]]]:
    """Train ``model`` on uint8 NHWC images; return it with the best-validation-epoch weights, and the history.

    Loss: cross entropy (with optional label smoothing) of the head's logits. Model selection:
    highest validation accuracy, ties broken by lower validation loss; without a validation set,
    the last epoch. History rows: epoch, train_loss, train_acc, val_loss, val_acc, seconds, and ``best``
    (True) on each epoch that became the kept one. The LP-FT head-only epochs are not in the history:
    ``on_lp_epoch`` gets a row of the same columns (no ``best``) for each of them.
    """
    if settings.mode not in MODES:
        raise ValueError(f"unknown finetune mode {settings.mode!r}; use one of {', '.join(MODES)}")
    if settings.epochs < 1 or settings.batch_size < 2:
        raise ValueError(f"need epochs >= 1 and batch_size >= 2, got {settings.epochs} and {settings.batch_size}")
    device = select_device(settings.device)
    if device.type == "cpu":  # as the pretraining engine does: no fresh pages for every step's large tensors
        keep_freed_memory()
    model.to(device).to(memory_format=torch.channels_last)  # as ssl_lib.engine does (and as torch's typing allows)
    x_train = nhwc_to_tensor(np.asarray(train_images), device)
    y_train = torch.as_tensor(np.asarray(train_labels), dtype=torch.long, device=device)
    has_val = val_images is not None and val_labels is not None and len(val_images) > 0
    if has_val:
        x_val = nhwc_to_tensor(np.asarray(val_images), device)
        y_val = torch.as_tensor(np.asarray(val_labels), dtype=torch.long, device=device)
    if int(y_train.max()) >= model.num_classes or int(y_train.min()) < 0:
        raise ValueError(f"train labels must lie in [0, {model.num_classes}), "
                         f"got [{int(y_train.min())}, {int(y_train.max())}]")

    if settings.head_init not in HEAD_INITS:
        raise ValueError(f"unknown head_init {settings.head_init!r}; use one of {', '.join(HEAD_INITS)}")
    generator = torch.Generator().manual_seed(settings.seed)
    val = (x_val, y_val) if has_val else None
    if settings.head_init == "prototype":
        _prototype_init(model, x_train, y_train)
    if settings.lp_epochs > 0:
        model.encoder.requires_grad_(False)
        head = torch.optim.AdamW(decay_groups(model.head.parameters(), settings.lp_lr, settings.weight_decay,
                                              exempt_norm_and_bias=False), lr=settings.lp_lr)
        # No warm-up: the head starts from its (prototype) init and the encoder is frozen.
        probe = _Phase("linear-probe", settings.lp_epochs, settings.lp_lr, warmup_fraction=0.0, min_warmup=0,
                       frozen_encoder=True)
        _fit(model, x_train, y_train, head, probe, settings, generator, val, on_epoch=on_lp_epoch)

    linear = settings.mode == "linear"
    model.encoder.requires_grad_(not linear)
    groups = decay_groups(model.head.parameters(), settings.lr, settings.weight_decay, exempt_norm_and_bias=False)
    if not linear:
        groups += decay_groups(model.encoder.parameters(), settings.lr * settings.encoder_lr_mult,
                               settings.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=settings.lr)
    history: list[dict[str, Any]] = []
    best_key: tuple[float, float] | None = None
    best_state: dict[str, torch.Tensor] | None = None

    def keep_best(record: dict[str, Any]) -> None:
        nonlocal best_key, best_state
        key = (record["val_acc"], -record["val_loss"])
        if best_key is None or key > best_key:
            best_key = key
            best_state = copy.deepcopy(model.state_dict())
            record["best"] = True

    def record_epoch(record: dict[str, Any]) -> None:
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)

    training = _Phase("fine-tuning", settings.epochs, settings.lr, warmup_fraction=settings.warmup_fraction,
                      min_warmup=1, frozen_encoder=linear)
    _fit(model, x_train, y_train, optimizer, training, settings, generator, val, on_val=keep_best,
         on_epoch=record_epoch, progress=f"train {settings.mode}" if progress else None)
    if best_state is not None:
        model.load_state_dict(best_state)
    model.encoder.requires_grad_(True)
    model.eval()
    return model, history


# How many of the last epochs' val accuracies stand for the kept model's score where it was not chosen.
UNCHOSEN_EPOCHS = 20


def val_optimism(history: list[dict[str, Any]]) -> float:
    """How far the kept epoch's val accuracy overstates the model, from ``train_classifier``'s history.

    The kept epoch is the best of all epochs on the same val images it is then scored on, so its val accuracy is
    the maximum of a noisy curve. optimism = max_e val_acc(e) - mean(val_acc over the last UNCHOSEN_EPOCHS epochs):
    the mean is what the model scores on those images without being chosen on them. 0.0 without val.
    """
    curve = [float(row["val_acc"]) for row in history if "val_acc" in row]
    if not curve:
        return 0.0
    return max(0.0, max(curve) - float(np.mean(curve[-UNCHOSEN_EPOCHS:])))
