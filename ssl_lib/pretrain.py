"""Self-supervised pretraining loop.

The (sub)set lives on the device as one uint8 tensor (or streams from host memory when it does not fit,
see ``ssl_lib.batches``); batches are gathered by index and augmented there, batched (as in airbench),
so no DataLoader workers compete for the CPU. All randomness derives from ``settings.seed``: model init
directly, data order and augmentation through the per-epoch seeds in the pseudo labels. Two CPU runs give
the identical loss sequence, and so does a run killed and resumed from its checkpoint.

Under ``torchrun`` (a process group is initialized) the loop is data-parallel: every rank takes an equal
slice of each global batch, BatchNorm and batch-level losses see the global batch (``ssl_lib.distributed``),
and DDP averages the gradients. Each rank draws its own augmentations.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssl_lib.acceleration import resolve_acceleration
from ssl_lib.batches import ImageRows, IndexedRows, make_batch_source
from ssl_lib.checkpoint import TrainingState, load_state, run_fingerprint, save_state
from ssl_lib.device import select_device
from ssl_lib.distributed import RankInfo, all_gather_objects, mean_across_ranks, rank_info
from ssl_lib.engine import Engine, build_model, data_parallel, make_engine, train_step
from ssl_lib.errors import DataError, TrainingDiverged
from ssl_lib.methods import get_method
from ssl_lib.pretrain_plan import PretrainSettings, subset_indices
from ssl_lib.progress import progress_bar
from ssl_lib.sizing import steps_per_pass
from ssl_lib.timing import Laps

log = logging.getLogger("ssl_lib.pretrain")


@dataclass
class PretrainResult:
    encoder_state: dict[str, torch.Tensor]  # plain CPU state_dict of the bare encoder
    feature_dim: int
    # per epoch: epoch, loss, images_per_sec, seconds, lr, seconds per phase (ssl_lib.timing), method stats
    history: list[dict[str, Any]]
    step_losses: list[float] = field(default_factory=list)
    subset: np.ndarray | None = None  # indices into the input images that were trained on


def _check_pseudo(pseudo: dict[str, np.ndarray], epochs: int, n: int) -> None:
    # Stale pseudo-labels (pretrain run by hand after a change of epochs or max_images) are the user's to remake.
    if "epoch_seed" not in pseudo or np.shape(pseudo["epoch_seed"]) != (epochs,):
        raise DataError(f"pseudo labels need 'epoch_seed' of shape ({epochs},); remake them for these settings "
                        "(dvc repro pseudo_labels, or make_pseudo_labels(settings, num_images))")
    for key, value in pseudo.items():
        if key != "epoch_seed" and np.shape(value) != (epochs, n):
            raise DataError(f"pseudo label {key!r} has shape {np.shape(value)}, expected ({epochs}, {n}) for these "
                            "settings: they were made with other epochs/max_images; rerun dvc repro pseudo_labels")


def _augmentation_seed(epoch_seed: int, rank: int) -> int:
    """Rank 0 keeps the epoch generator (so one process is unchanged); other ranks get their own stream."""
    return int(np.random.SeedSequence([int(epoch_seed), rank]).generate_state(1, np.uint64)[0] >> 1)


def _check_images(images: ImageRows) -> None:
    if np.dtype(images.dtype) != np.uint8 or len(images.shape) != 4:
        raise ValueError(f"images must be uint8 NHWC, got {images.dtype} with shape {tuple(images.shape)}")


def _rank_device(settings: PretrainSettings, ranks: RankInfo) -> torch.device:
    device = select_device(settings.device)
    if ranks.world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    return device


class _Trainer:
    """The engine's state plus the run's record, and how both are checkpointed and restored."""

    def __init__(self, engine: Engine, ranks: RankInfo) -> None:
        self.engine, self.ranks = engine, ranks
        self.model, self.device = engine.model, engine.device
        self.optimizer, self.scheduler, self.scaler = engine.optimizer, engine.scheduler, engine.scaler
        self.history: list[dict[str, Any]] = []
        self.step_losses: list[float] = []

    def restore(self, state: TrainingState) -> None:
        self.model.load_state_dict(state.model)
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        self.scaler.load_state_dict(state.scaler)
        self.history, self.step_losses = list(state.history), list(state.step_losses)
        torch.set_rng_state(state.torch_rng_states[self.ranks.rank])
        if self.device.type == "cuda" and state.cuda_rng_states:
            torch.cuda.set_rng_state(state.cuda_rng_states[self.ranks.rank], self.device)

    def save(self, path: Path, fingerprint: str, step: int, generator: torch.Generator,
             epoch_losses: list[torch.Tensor], epoch_stats: dict[str, list[torch.Tensor]]) -> None:
        # Every rank contributes its RNG streams and partial-epoch losses; rank 0 writes the file.
        local: dict[str, Any] = {
            "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "losses": [float(v) for v in epoch_losses],
            "stats": {k: [float(v) for v in vs] for k, vs in epoch_stats.items()},
        }
        parts = all_gather_objects(local)
        if not self.ranks.is_main:
            return
        state = TrainingState(
            fingerprint=fingerprint, step=step,
            model={k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(), history=self.history, step_losses=self.step_losses,
            epoch_losses=[p["losses"] for p in parts], epoch_stats=[p["stats"] for p in parts],
            generator_states=[p["generator"] for p in parts], torch_rng_states=[p["torch_rng"] for p in parts],
            cuda_rng_states=[p["cuda_rng"] for p in parts if p["cuda_rng"] is not None])
        save_state(state, path)


def pretrain(images: ImageRows, mean: list[float], std: list[float], pseudo: dict[str, np.ndarray],
             settings: PretrainSettings, on_epoch: Callable[[dict[str, Any]], None] | None = None,
             progress: bool = True, checkpoint_path: str | Path | None = None,
             on_step: Callable[[int], None] | None = None) -> PretrainResult:
    """Pretrain ``settings.backbone`` with ``settings.method`` on uint8 NHWC ``images``.

    ``images`` may be a numpy array or a memory map (rows are read by index). ``mean``/``std`` (per
    channel, on the [0, 1] scale) normalize inside the model. ``pseudo`` comes from
    ``make_pseudo_labels(settings, len(images))``. With ``checkpoint_path`` and
    ``settings.checkpoint_every``, the state is saved there every that many steps, and a checkpoint
    already there from the same run is resumed. ``on_step(steps_done)`` runs after each optimizer step.
    Returns the bare encoder's weights.
    """
    get_method(settings.method).resolve_options(settings.options)  # fail on a bad option before any work
    if settings.epochs < 1 or settings.batch_size < 2:
        raise ValueError(f"need epochs >= 1 and batch_size >= 2, got {settings.epochs} and {settings.batch_size}")
    if settings.checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0 steps (0 = off), got {settings.checkpoint_every}")
    _check_images(images)
    subset = subset_indices(len(images), settings)
    n = len(subset)
    _check_pseudo(pseudo, settings.epochs, n)
    ranks = rank_info()
    device = _rank_device(settings, ranks)
    accel = resolve_acceleration(device, settings.precision, settings.channels_last, settings.compile)

    rows = images if n == len(images) else IndexedRows(images, subset)
    source = make_batch_source(rows, device, settings.data_placement)
    size, channels = int(images.shape[1]), int(images.shape[3])
    model, encoder, feature_dim = build_model(settings.method, settings.backbone, settings.options, mean, std,
                                              channels, size, settings.seed, device, accel, ranks.world_size)

    global_batch = min(settings.batch_size, n)
    if global_batch % ranks.world_size:
        raise ValueError(f"batch_size {global_batch} must be divisible by the number of processes "
                         f"({ranks.world_size}): each takes an equal share of the global batch")
    local_batch = global_batch // ranks.world_size
    rank_slice = slice(ranks.rank * local_batch, (ranks.rank + 1) * local_batch)
    # Drop the ragged last batch: a tiny batch gives BatchNorm and contrastive losses noisy statistics.
    steps_per_epoch = steps_per_pass(n, global_batch)
    total_steps = steps_per_epoch * settings.epochs
    engine = make_engine(model, accel, device, total_steps, settings.optimizer, settings.lr, settings.weight_decay,
                         settings.warmup_fraction)
    trainer = _Trainer(engine, ranks)

    state, fingerprint = None, ""
    checkpoint: Path | None = None  # where to save checkpoints; None: this run saves none
    if checkpoint_path is not None and settings.checkpoint_every:
        checkpoint = Path(checkpoint_path)
        fingerprint = run_fingerprint(settings.trajectory(), pseudo, images, ranks.world_size)
        state, why = load_state(checkpoint_path, fingerprint)
        if state is not None:
            trainer.restore(state)
        if ranks.is_main and why != "no checkpoint":
            log.info("%s: %s", checkpoint_path, why)
    start_step = state.step if state is not None else 0

    if ranks.world_size > 1:
        data_parallel(engine)

    per_sample = {k: torch.as_tensor(np.asarray(v)) for k, v in pseudo.items() if k != "epoch_seed"}
    bar = progress_bar(total=total_steps, initial=start_step, enabled=progress and ranks.is_main,
                       desc=f"pretrain {settings.method}", unit="step")
    model.train()
    # Seconds per epoch spent gathering batches, in the steps, writing checkpoints and on the rest (history columns).
    laps = Laps(device, ("data", "step", "checkpoint", "bookkeeping"))
    try:
        for epoch in range(start_step // steps_per_epoch, settings.epochs):
            epoch_seed = int(pseudo["epoch_seed"][epoch])
            generator = torch.Generator().manual_seed(epoch_seed)
            order = torch.randperm(n, generator=generator)  # the same global order on every rank
            if ranks.rank > 0:
                generator = torch.Generator().manual_seed(_augmentation_seed(epoch_seed, ranks.rank))
            first_step = start_step - epoch * steps_per_epoch if epoch == start_step // steps_per_epoch else 0
            epoch_losses: list[torch.Tensor] = []
            epoch_stats: dict[str, list[torch.Tensor]] = {}
            if first_step > 0 and state is not None:  # resumed mid-epoch
                generator.set_state(state.generator_states[ranks.rank])
                epoch_losses = [torch.tensor(v, device=device) for v in state.epoch_losses[ranks.rank]]
                epoch_stats = {k: [torch.tensor(v, device=device) for v in vs]
                               for k, vs in state.epoch_stats[ranks.rank].items()}
            start = time.perf_counter()
            laps.start()
            for step, idx, batch in source.batches(order, global_batch, rank_slice, first_step, steps_per_epoch):
                targets = {k: v[epoch, idx].to(device) for k, v in per_sample.items()}
                done = epoch * steps_per_epoch + step + 1
                x = batch.float().div_(255.0)
                laps.lap("data")  # the batch's gather (or streaming) and conversion, and its pseudo targets
                loss = train_step(engine, x, targets, generator, done - 1)
                laps.lap("step")  # augmentation (batched, in the method's forward), forward, backward, optimizer
                epoch_losses.append(loss.detach().float())
                for key, value in model.last_stats.items():
                    epoch_stats.setdefault(key, []).append(value.detach().float())
                bar.update(1)
                if progress and ranks.is_main and (step % 10 == 0 or step == steps_per_epoch - 1):
                    elapsed = time.perf_counter() - start
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", refresh=False,
                                    img_s=f"{(step + 1 - first_step) * global_batch / max(elapsed, 1e-9):.0f}")
                # A checkpoint at an epoch's last step is written once that epoch's record is in the history.
                if checkpoint is not None and done % settings.checkpoint_every == 0 and step < steps_per_epoch - 1:
                    laps.lap("bookkeeping")
                    trainer.save(checkpoint, fingerprint, done, generator, epoch_losses, epoch_stats)
                    laps.lap("checkpoint")
                if on_step is not None:
                    on_step(done)
                laps.lap("bookkeeping")  # the loss and stats kept, the progress bar
            seconds = time.perf_counter() - start
            losses = mean_across_ranks(torch.stack(epoch_losses).cpu())
            phases = laps.columns()  # after the wait for the device just above
            # Checked once per epoch, on the losses already brought to the CPU: no extra wait for the device.
            diverged = torch.nonzero(~torch.isfinite(losses)).flatten().tolist()
            if diverged:
                raise TrainingDiverged.at("pretraining", epoch * steps_per_epoch + diverged[0] + 1, total_steps,
                                          float(losses[diverged[0]]), settings.lr, "pretrain.lr")
            trainer.step_losses += losses.tolist()
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "loss": float(losses.mean()),
                "images_per_sec": (steps_per_epoch - first_step) * global_batch / max(seconds, 1e-9),
                "seconds": seconds,
                "lr": float(trainer.scheduler.get_last_lr()[0]),
                **phases,
            }
            for key, values in epoch_stats.items():
                record[key] = float(mean_across_ranks(torch.stack(values).cpu()).mean())
            trainer.history.append(record)
            done = (epoch + 1) * steps_per_epoch
            if checkpoint is not None and done % settings.checkpoint_every == 0 and done < total_steps:
                trainer.save(checkpoint, fingerprint, done, generator, [], {})
            if on_epoch is not None:
                on_epoch(record)
    finally:
        bar.close()

    state_dict = {k: v.detach().cpu().contiguous().clone() for k, v in encoder.state_dict().items()}
    return PretrainResult(encoder_state=state_dict, feature_dim=feature_dim, history=trainer.history,
                          step_losses=trainer.step_losses, subset=subset)
