"""Optimizer pieces shared by pretraining, fine-tuning and self-training: parameter groups and the LR schedule."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch


def decay_groups(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float,
                 exempt_norm_and_bias: bool = True) -> list[dict]:
    """Parameter groups at ``lr``: weights with ``weight_decay``, and BatchNorm/bias parameters without it
    (decaying those only fights the normalization). ``exempt_norm_and_bias=False``: one group, all decayed
    (a linear head's bias is decayed in fine-tuning; kept so that its numbers do not move)."""
    params = list(params)
    if not exempt_norm_and_bias:
        return [{"params": params, "lr": lr, "weight_decay": weight_decay}]
    return [{"params": [p for p in params if p.ndim > 1], "lr": lr, "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "lr": lr, "weight_decay": 0.0}]


def warmup_cosine(total_steps: int, warmup_fraction: float, min_warmup: int = 1) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over the first ``warmup_fraction`` of steps (at least ``min_warmup``
    steps), then cosine to 0."""
    warmup = max(min_warmup, int(round(total_steps * warmup_fraction)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float,
                           min_warmup: int = 1) -> torch.optim.lr_scheduler.LambdaLR:
    """``optimizer``'s groups follow ``warmup_cosine``, each from its own initial lr; step it once per step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup_fraction, min_warmup))
