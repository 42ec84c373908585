"""Optimizer pieces shared by pretraining, fine-tuning and self-training: parameter groups and the LR schedule."""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch


def decay_groups(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float) -> list[dict]:
    """Two groups at ``lr``: weights with ``weight_decay``, and BatchNorm/bias parameters without it
    (decaying those only fights the normalization)."""
    params = list(params)
    return [{"params": [p for p in params if p.ndim > 1], "lr": lr, "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "lr": lr, "weight_decay": 0.0}]


def warmup_cosine(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over the first ``warmup_fraction`` of steps, then cosine to 0."""
    warmup = max(1, int(round(total_steps * warmup_fraction)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor
