"""Pick the compute device: cuda, then mps, then cpu."""
from __future__ import annotations

import torch

from ssl_lib.errors import ConfigError

# The preference comes from a ``device`` param of one of these sections; the message cannot know which.
_KEYS = "pretrain.device, finetune.device or self_train.device"


def select_device(preference: str = "auto") -> torch.device:
    """Return the device for ``preference`` ("auto", "cpu", "cuda", "cuda:1", "mps").

    "auto" takes the fastest available one. An explicit device that is unknown or not available raises
    a ConfigError that says so, rather than failing later inside a kernel.
    """
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(preference)
    except (RuntimeError, TypeError):  # what torch raises for a string it cannot parse ("gpu", "")
        device = None
    # Other torch device types (meta, xpu, ...) parse, but nothing here is built or tested for them.
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unknown device {preference!r}; set {_KEYS} to auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {preference!r} was requested but CUDA is not available; set {_KEYS} "
                          "to 'auto' or 'cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {preference!r} was requested but this machine has "
                          f"{torch.cuda.device_count()} CUDA device(s); set {_KEYS} to 'cuda' or 'auto'")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {preference!r} was requested but MPS is not available; set {_KEYS} "
                          "to 'auto' or 'cpu'")
    return device
