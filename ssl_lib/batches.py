"""Where the pretraining images live, and how a batch of them reaches the device.

* ``DeviceBatches``: the whole (sub)set on the device as one uint8 tensor; a batch is an index gather
  there (as in airbench): no host work per step at all.
* ``StreamingBatches``: for data that do not fit. The images stay in host memory or in a memory-mapped
  ``.npy``; each batch is read by index, pinned (on CUDA) and copied while the previous one trains.

Both return the same uint8 NCHW tensor for the same indices, so the augmentation that follows on the
device, and the whole run, are identical whichever is used.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import numpy as np
import torch

from ssl_lib.augment import nhwc_to_tensor

PLACEMENTS = ("auto", "device", "stream")
# Keep the resident dataset to a fraction of free memory: activations, optimizer state and the
# augmented views need the rest.
_DEVICE_FRACTION = 0.25


class ImageRows(Protocol):
    """What the loop needs from the images: uint8 NHWC rows by integer index (numpy arrays, memmaps)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype: ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: np.ndarray) -> np.ndarray: ...


class IndexedRows:
    """Rows ``indices`` of ``base`` (e.g. a memory-mapped images.npy), without copying them."""

    def __init__(self, base: ImageRows, indices: np.ndarray) -> None:
        self.base, self.indices = base, np.asarray(indices, dtype=np.int64)
        self.shape = (len(self.indices), *base.shape[1:])
        self.dtype = base.dtype

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: np.ndarray) -> np.ndarray:
        rows = self.indices[np.asarray(index)]
        # Reading in ascending order keeps a memory map's reads sequential; then restore the order asked for.
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        out[order] = self.base[rows[order]]
        return out


class BatchSource(Protocol):
    def batches(self, order: torch.Tensor, batch_size: int, rank_slice: slice,
                start_step: int, steps: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield (step, local indices, uint8 NCHW batch on the device) for ``steps`` steps of ``order``."""
        ...


def _step_indices(order: torch.Tensor, step: int, batch_size: int, rank_slice: slice) -> torch.Tensor:
    return order[step * batch_size:(step + 1) * batch_size][rank_slice]


class DeviceBatches:
    def __init__(self, images: ImageRows, device: torch.device) -> None:
        self.data = nhwc_to_tensor(images[np.arange(len(images))], device)
        self.device = device

    def batches(self, order: torch.Tensor, batch_size: int, rank_slice: slice,
                start_step: int, steps: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        for step in range(start_step, steps):
            idx = _step_indices(order, step, batch_size, rank_slice)
            yield step, idx, self.data[idx.to(self.device)]


class StreamingBatches:
    def __init__(self, images: ImageRows, device: torch.device) -> None:
        self.images, self.device = images, device
        self.pin = device.type == "cuda"

    def _load(self, idx: torch.Tensor) -> torch.Tensor:
        batch = nhwc_to_tensor(self.images[idx.numpy()])
        return batch.pin_memory() if self.pin else batch

    def batches(self, order: torch.Tensor, batch_size: int, rank_slice: slice,
                start_step: int, steps: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        if start_step >= steps:
            return
        # One background reader: batch k+1 is read from host memory/disk while batch k trains.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-reader") as reader:
            pending: Future = reader.submit(self._load, _step_indices(order, start_step, batch_size, rank_slice))
            for step in range(start_step, steps):
                idx = _step_indices(order, step, batch_size, rank_slice)
                batch = pending.result()
                if step + 1 < steps:
                    pending = reader.submit(self._load, _step_indices(order, step + 1, batch_size, rank_slice))
                yield step, idx, batch.to(self.device, non_blocking=self.pin)


def free_memory_bytes(device: torch.device) -> int:
    """Free memory where the data would live: the GPU's, or the host's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # not POSIX: assume it fits, as before streaming existed
        return 1 << 62


def choose_placement(images: ImageRows, device: torch.device, placement: str = "auto") -> str:
    """``device`` when the uint8 data take under a quarter of free memory (or when asked), else ``stream``."""
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown data placement {placement!r}; use one of {', '.join(PLACEMENTS)}")
    if placement != "auto":
        return placement
    nbytes = int(np.prod(images.shape)) * np.dtype(images.dtype).itemsize
    return "device" if nbytes <= _DEVICE_FRACTION * free_memory_bytes(device) else "stream"


def make_batch_source(images: ImageRows, device: torch.device, placement: str = "auto") -> BatchSource:
    chosen = choose_placement(images, device, placement)
    return DeviceBatches(images, device) if chosen == "device" else StreamingBatches(images, device)
