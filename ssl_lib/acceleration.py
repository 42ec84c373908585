"""Per-device choices of numeric precision, memory layout and compilation, with defaults that pay off.

``auto`` means: on CUDA, bf16 autocast (fp16 with loss scaling where bf16 is missing), channels_last
and ``torch.compile``; on a CPU, fp32 (without bf16 hardware, bf16 autocast runs 10-16x slower), channels_last
(1.5x on the ConvNet step) and no compile (after about a minute of compiling, the ConvNet step ran 1.13-1.25x
slower: docs/performance.md, "Throughput against lightly"). On a CPU the allocator also keeps freed memory for reuse
(``keep_freed_memory``).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from dataclasses import dataclass

import torch

from ssl_lib.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Acceleration:
    dtype: torch.dtype  # autocast dtype; float32 means no autocast
    channels_last: bool
    compile: bool

    @property
    def precision(self) -> str:
        return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)

    def grad_scaler(self, device: torch.device) -> torch.amp.GradScaler:
        """Loss scaling is needed for fp16 only; a disabled scaler is a pass-through."""
        return torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)


def resolve_acceleration(device: torch.device, precision: str = "auto", channels_last: bool | None = None,
                         compile: bool | None = None) -> Acceleration:
    """Turn the user's choices (``auto``/None = decide for this device) into concrete ones."""
    if precision not in PRECISIONS:  # params.yaml only allows these: another value is a caller's bug
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    cuda = device.type == "cuda"
    if precision == "auto":
        if cuda:
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
    if precision == "fp16" and not cuda:
        raise ConfigError("precision fp16 needs a CUDA GPU (loss-scaled fp16 autocast); set pretrain.precision "
                          f"to fp32 or auto on {device.type}")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return Acceleration(dtype=dtype,
                        channels_last=True if channels_last is None else bool(channels_last),
                        compile=cuda if compile is None else bool(compile))


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process for the next allocation; False where it cannot (no glibc).

    Why: glibc serves an allocation above its mmap threshold (adaptive, but never above 32 MB) with a fresh
    mapping and unmaps it when freed. A training step allocates tensors that large anew every step (the ConvNet's
    first layer over both views of a 256 batch: 51 MB each, a dozen of them), so every step the kernel faults in
    and zeroes new pages for them: a third of a CPU ConvNet step here (docs/performance.md, "Throughput against
    lightly"). With no mmap and a trim threshold of 2 GB, those blocks are reused from the heap instead. The process
    keeps its peak memory between steps, which a training loop reaches again at the next step anyway.
    Process-wide, and only for allocations made after the call.
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
