"""Resumable training state: written atomically every N steps, read back only by the run it belongs to.

A checkpoint holds everything the next step depends on (model with heads, target networks and queues,
optimizer, LR schedule, loss scaler, every rank's augmentation generator and torch RNG, the step counter
and the partial epoch's losses), so a run resumed from it ends with the same weights as one never
interrupted. Its ``fingerprint`` ties it to the settings, pseudo labels and data of the run: a checkpoint
from any other run is ignored, never half-applied.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssl_lib.io import atomic_path

FORMAT_VERSION = 1


def run_fingerprint(settings: dict[str, Any], pseudo: dict[str, np.ndarray], images: Any, world_size: int) -> str:
    """A digest of what determines the run's trajectory (device placement and checkpoint cadence excluded)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(f"world={world_size};shape={tuple(images.shape)};dtype={images.dtype}".encode())
    for key in sorted(pseudo):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(pseudo[key]).tobytes())
    # Hashing a strided sample of the images keeps this cheap for big data while catching a changed dataset;
    # the pipeline's DVC hashes guard the full content.
    n = len(images)
    sample = np.unique(np.linspace(0, max(n - 1, 0), num=min(n, 1024)).astype(np.int64))
    digest.update(np.ascontiguousarray(images[sample]).tobytes())
    return digest.hexdigest()


@dataclass
class TrainingState:
    fingerprint: str
    step: int  # optimizer steps completed
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]
    history: list[dict[str, Any]]
    step_losses: list[float]
    epoch_losses: list[list[float]]  # per rank, the losses of the current, unfinished epoch
    epoch_stats: list[dict[str, list[float]]]  # per rank, the method's stats of that epoch
    generator_states: list[torch.Tensor]  # per rank, the epoch generator after ``step`` steps
    torch_rng_states: list[torch.Tensor]  # per rank
    cuda_rng_states: list[Any] = field(default_factory=list)  # per rank; empty without CUDA


def save_state(state: TrainingState, path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically: a crash mid-write leaves the previous checkpoint intact."""
    payload = {"format": FORMAT_VERSION, **state.__dict__}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_state(path: str | Path, fingerprint: str) -> tuple[TrainingState | None, str]:
    """The checkpoint at ``path`` if it belongs to the run with ``fingerprint``; else None and why."""
    path = Path(path)
    if not path.is_file():
        return None, "no checkpoint"
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a torn or foreign file: start afresh rather than fail the run
        return None, f"unreadable checkpoint ({type(exc).__name__}: {exc})"
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        return None, "checkpoint of another format version"
    if payload.get("fingerprint") != fingerprint:
        return None, "checkpoint of a different run (settings, pseudo labels or data changed)"
    payload.pop("format")
    return TrainingState(**payload), f"resuming from step {payload['step']}"
