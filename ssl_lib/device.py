"""Pick the compute device: cuda, then mps, then cpu."""
from __future__ import annotations

import torch


def select_device(preference: str = "auto") -> torch.device:
    """Return the device for ``preference`` ("auto", "cpu", "cuda", "cuda:1", "mps").

    "auto" takes the fastest available one. An explicit device that is not available raises
    a ValueError that says so, rather than failing later inside a kernel.
    """
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {preference!r} was requested but CUDA is not available; use 'auto' or 'cpu'")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {preference!r} was requested but MPS is not available; use 'auto' or 'cpu'")
    return device
