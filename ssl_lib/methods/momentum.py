"""Momentum (EMA) target networks, shared by MoCo, BYOL and DINO.

The target is a frozen deep copy of the online module; after every optimizer step
(``SSLMethod.after_step``) its parameters move towards the online ones,
``target <- m * target + (1 - m) * online``, and its buffers (BatchNorm statistics) are copied.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


def make_target(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` that gets no gradients (so the optimizer never changes it)."""
    target = copy.deepcopy(module)
    target.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target_params <- momentum * target_params + (1 - momentum) * online_params; buffers copied."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.lerp_(o.detach(), 1.0 - momentum)
    for tb, ob in zip(target.buffers(), online.buffers(), strict=True):
        tb.copy_(ob)


def cosine_momentum(base: float, step: int, total_steps: int) -> float:
    """BYOL's schedule: m = 1 - (1 - base) * (cos(pi * step / total_steps) + 1) / 2, from ``base`` up to 1."""
    progress = min(1.0, max(0.0, step / max(1, total_steps)))
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0
