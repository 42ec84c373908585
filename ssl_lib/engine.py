"""The pretraining step and what it needs: the model on its device, the optimizer with its LR schedule.

``ssl_lib.pretrain`` runs these (adding data order, checkpoints and history) and ``benchmarks/throughput.py``
times them, so the benchmark measures the step the pipeline takes, autocast, loss scaling and compile included.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ssl_lib.acceleration import Acceleration, keep_freed_memory
from ssl_lib.distributed import convert_batchnorm
from ssl_lib.methods import get_method
from ssl_lib.methods.base import SSLMethod
from ssl_lib.models.backbones import NormalizedEncoder, build_backbone
from ssl_lib.optim import decay_groups, warmup_cosine_schedule

OPTIMIZERS = ("adamw", "sgd")


def build_model(method: str, backbone: str, options: dict[str, Any], mean: list[float], std: list[float],
                channels: int, size: int, seed: int, device: torch.device, accel: Acceleration,
                world_size: int = 1) -> tuple[SSLMethod, nn.Module, int]:
    """``method`` around a ``backbone`` encoder initialised from ``seed``, on ``device`` in the memory layout
    ``accel`` chose, its encoder compiled if ``accel`` says so. ``options`` go to the method as given.
    Returns (model, bare encoder, feature dim)."""
    method_cls = get_method(method)
    # Seed model init without leaving the global RNG changed for the caller.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder, feature_dim = build_backbone(backbone, channels, size)
        model = method_cls(NormalizedEncoder(encoder, mean, std), feature_dim, channels, size, **options)
    if world_size > 1:
        convert_batchnorm(model)  # same state-dict keys; statistics over the global batch
    model.to(device)
    if accel.channels_last:
        model.to(memory_format=torch.channels_last)
    if accel.compile:
        model.encoder.compile()  # in place: state-dict keys, and so checkpoints, stay those of the plain module
    return model, encoder, feature_dim


def build_optimizer(model: nn.Module, optimizer: str, lr: float, weight_decay: float, total_steps: int,
                    warmup_fraction: float) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW or SGD (nesterov, momentum 0.9) over the decay/no-decay groups, and the warm-up + cosine schedule."""
    groups = decay_groups(model.parameters(), lr, weight_decay)
    if optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=lr)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
    return opt, warmup_cosine_schedule(opt, total_steps, warmup_fraction)


@dataclass
class Engine:
    """Everything one training step reads or updates."""

    model: SSLMethod
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    accel: Acceleration
    device: torch.device
    total_steps: int
    forward: nn.Module | None = None  # a wrapper the loss goes through instead of ``model`` (DDP); None = model


def make_engine(model: SSLMethod, accel: Acceleration, device: torch.device, total_steps: int, optimizer: str,
                lr: float, weight_decay: float, warmup_fraction: float) -> Engine:
    """The optimizer, schedule and (fp16-only) gradient scaler for ``total_steps`` steps of ``model``; on a CPU,
    the allocator keeps freed memory for the next step (``acceleration.keep_freed_memory``)."""
    if device.type == "cpu":
        keep_freed_memory()
    opt, scheduler = build_optimizer(model, optimizer, lr, weight_decay, total_steps, warmup_fraction)
    return Engine(model, opt, scheduler, accel.grad_scaler(device), accel, device, total_steps)


def data_parallel(engine: Engine) -> None:
    """Route the step through DistributedDataParallel (a process group must be initialized)."""
    import warnings

    from torch.nn.parallel import DistributedDataParallel

    device = engine.device
    # Buffers (BatchNorm statistics, queues, centers) are kept equal across ranks by construction, so
    # no per-step broadcast. torch 2.14 deprecates the flag in favour of one that cannot yet express this.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        engine.forward = DistributedDataParallel(engine.model, device_ids=[device.index] if device.type == "cuda"
                                                 else None, broadcast_buffers=False)


def train_step(engine: Engine, images: torch.Tensor, targets: dict[str, torch.Tensor], generator: torch.Generator,
               step: int) -> torch.Tensor:
    """One optimizer step on float ``images`` in [0, 1] (B, C, H, W) on the device; ``step`` counts from 0 over
    the run. Returns the loss tensor; nothing here waits for the device."""
    forward = engine.model if engine.forward is None else engine.forward
    with engine.accel.autocast(engine.device):
        loss = forward(images, targets, generator)
    engine.optimizer.zero_grad(set_to_none=True)
    engine.scaler.scale(loss).backward()
    engine.scaler.step(engine.optimizer)
    engine.scaler.update()
    engine.model.after_step(step, engine.total_steps)
    engine.scheduler.step()
    return loss
