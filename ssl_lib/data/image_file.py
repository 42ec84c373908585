"""images.npy written and read in blocks of rows, so memory stays flat whatever the number of images.

The file is preallocated (``np.lib.format.open_memmap``: the .npy header, then space for every row) and filled
block by block: each block of rows is memory-mapped alone, written, flushed and unmapped, in this process or in
a pool of worker processes (one per core) that decode files or copy rows of a previous images.npy straight
into their block. Nothing ever holds more than one block: a process's resident memory does not grow with
the file, as it would through one map of the whole file, whose touched pages all count as resident.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from .decode import is_colour, open_image, to_array

_BLOCK_BYTES = 8 << 20  # a block of rows is about this many bytes of pixels
_MAX_BLOCK_ROWS = 1024
# Fewer files than this decode in this process: starting worker processes (an interpreter and imports each)
# costs more than it saves.
MIN_PARALLEL_DECODES = 1000


@dataclass(frozen=True)
class OldRows:
    """Rows of a previous images.npy that may be copied instead of decoding their files again."""

    path: str
    offset: int                  # bytes before the first row (the .npy header)
    shape: tuple[int, ...]       # of one row: (H, W, C)


@dataclass(frozen=True)
class FillResult:
    sha1: list[str]              # of each written row's pixel bytes ("" for a failed row)
    colour: np.ndarray           # bool per row: the decoded pixels hold colour (decode.is_colour)
    failed: dict[int, str]       # row -> why its file could not be decoded


def create(path: str | os.PathLike[str], shape: tuple[int, ...]) -> OldRows:
    """Preallocate a uint8 .npy of ``shape`` at ``path``; returns where its rows are."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    offset = int(array.offset)
    del array  # unmaps: rows are written through windows of their own
    return OldRows(str(path), offset, tuple(shape[1:]))


def open_rows(path: str | os.PathLike[str]) -> tuple[OldRows, int]:
    """Where the rows of an existing uint8 (N, ...) .npy are, and N."""
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    if array.dtype != np.uint8 or array.ndim < 2:
        raise ValueError(f"{path} is {array.dtype} {array.shape}, not uint8 rows")
    rows = OldRows(str(path), int(array.offset), tuple(array.shape[1:]))
    count = len(array)
    del array
    return rows, count


def _row_bytes(shape: Sequence[int]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def block_rows(row_shape: Sequence[int], count: int, workers: int = 1) -> int:
    """Rows per block: about _BLOCK_BYTES, and at least 4 blocks per worker so the pool stays balanced."""
    rows = max(1, min(_MAX_BLOCK_ROWS, _BLOCK_BYTES // max(1, _row_bytes(row_shape))))
    if workers > 1:
        rows = min(rows, max(1, -(-count // (4 * workers))))
    return rows


def _window(target: OldRows, start: int, count: int) -> np.memmap:
    return np.memmap(target.path, dtype=np.uint8, mode="r+", offset=target.offset + start * _row_bytes(target.shape),
                     shape=(count, *target.shape))


def _fill_block(job: tuple[OldRows, int, list[str | int], str, tuple[int, int], OldRows | None]) -> FillResult:
    """Fill rows ``start..`` of ``target``: a str item is an image file to decode, an int a row of ``old``."""
    target, start, items, mode, size_wh, old = job
    window = _window(target, start, len(items))
    sha1: list[str] = []
    colour = np.zeros(len(items), dtype=bool)
    failed: dict[int, str] = {}
    old_file = open(old.path, "rb") if old is not None else None  # noqa: SIM115 (closed below, after the loop)
    try:
        for i, item in enumerate(items):
            if isinstance(item, str):
                try:
                    pixels = to_array(open_image(item), mode, size_wh)
                except Exception as exc:  # PIL raises many types for bad files; reported, never fatal
                    failed[start + i] = f"not a readable image: {type(exc).__name__}: {exc}"
                    sha1.append("")
                    continue
            else:
                assert old is not None and old_file is not None
                size = _row_bytes(old.shape)
                raw = os.pread(old_file.fileno(), size, old.offset + item * size)
                pixels = np.frombuffer(raw, dtype=np.uint8).reshape(old.shape)
                if pixels.shape[-1] != target.shape[-1]:  # a grey row reused in an RGB file
                    pixels = np.repeat(pixels, target.shape[-1], axis=-1)
            window[i] = pixels
            sha1.append(hashlib.sha1(np.ascontiguousarray(pixels).tobytes()).hexdigest())
            colour[i] = is_colour(pixels)
    finally:
        if old_file is not None:
            old_file.close()
        window.flush()
        del window
    return FillResult(sha1, colour, failed)


def fill(target: OldRows, items: Sequence[str | int], *, mode: str, size_wh: tuple[int, int],
         old: OldRows | None = None, workers: int = 1) -> FillResult:
    """Fill every row of ``target`` from ``items`` (file paths to decode, or row numbers of ``old``).

    ``workers`` > 1 runs the blocks in that many processes (when there are at least ``MIN_PARALLEL_DECODES`` files
    to decode); the result is the same as with one. Worker processes are spawned: a script that calls this needs
    the usual ``if __name__ == "__main__":`` guard.
    """
    if sum(isinstance(item, str) for item in items) < MIN_PARALLEL_DECODES:
        workers = 1
    step = block_rows(target.shape, len(items), workers)
    jobs = [(target, start, list(items[start:start + step]), mode, size_wh, old)
            for start in range(0, len(items), step)]
    if workers > 1 and len(jobs) > 1:
        # spawn, not fork: the parent may hold threads (MLflow's) whose locks a forked child would inherit.
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)),
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(_fill_block, jobs))
    else:
        parts = [_fill_block(job) for job in jobs]
    return FillResult(sha1=[s for p in parts for s in p.sha1],
                      colour=np.concatenate([p.colour for p in parts]) if parts else np.zeros(0, bool),
                      failed={row: why for p in parts for row, why in p.failed.items()})


def write_array(target: OldRows, images: np.ndarray) -> list[str]:
    """Copy in-memory ``images`` into ``target`` block by block; returns each row's sha1."""
    sha1: list[str] = []
    step = block_rows(target.shape, len(images))
    for start in range(0, len(images), step):
        block = np.ascontiguousarray(images[start:start + step], dtype=np.uint8)
        window = _window(target, start, len(block))
        window[:] = block
        window.flush()
        del window
        sha1.extend(hashlib.sha1(row.tobytes()).hexdigest() for row in block)
    return sha1


def iter_blocks(source: OldRows, count: int, rows: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """The rows of ``source`` (all ``count``, or those in sorted ``rows``) in blocks read into one reused buffer."""
    step = block_rows(source.shape, count)
    size = _row_bytes(source.shape)
    buffer = np.empty((step, *source.shape), dtype=np.uint8)
    with open(source.path, "rb", buffering=0) as f:
        for start in range(0, count, step):
            n = min(step, count - start)
            view = buffer[:n]
            target, done = view.reshape(-1).data, 0
            while done < n * size:  # a read may return less than asked
                got = os.preadv(f.fileno(), [target[done:]], source.offset + start * size + done)
                if not got:
                    raise ValueError(f"{source.path} ends before row {start + n}")
                done += got
            if rows is None:
                yield view
            else:
                picked = rows[(rows >= start) & (rows < start + n)] - start
                if len(picked):
                    yield view[picked]


def drop_rows(target: OldRows, count: int, keep: np.ndarray) -> int:
    """Remove the rows of ``target`` where ``keep`` is False, in place; returns the new row count."""
    kept = np.flatnonzero(keep)
    if len(kept) == count:
        return count
    size = _row_bytes(target.shape)
    step = block_rows(target.shape, count)
    with open(target.path, "r+b", buffering=0) as f:
        # Rows only move down and blocks go in order, so a block never overwrites a row not yet moved.
        for dst in range(0, len(kept), step):
            sources = kept[dst:dst + step]
            data = b"".join(os.pread(f.fileno(), size, target.offset + int(s) * size) for s in sources)
            os.pwrite(f.fileno(), data, target.offset + dst * size)
        f.truncate(target.offset + len(kept) * size)
        _rewrite_header(f, target.offset, (len(kept), *target.shape))
    return len(kept)


def _rewrite_header(f, offset: int, shape: tuple[int, ...]) -> None:
    import io

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    if header.tell() != offset:  # .npy headers are padded to 64 bytes: a shorter shape keeps the length
        raise ValueError(f"new .npy header is {header.tell()} bytes, the file's is {offset}")
    f.seek(0)
    f.write(header.getvalue())


def narrow_channels(source: OldRows, count: int, target_path: str | os.PathLike[str]) -> tuple[OldRows, list[str]]:
    """Copy ``source``'s rows keeping only the first channel (grey images decoded as RGB); returns the copy's sha1s."""
    target = create(target_path, (count, *source.shape[:-1], 1))
    sha1: list[str] = []
    start = 0
    for block in iter_blocks(source, count):
        grey = np.ascontiguousarray(block[..., :1])
        window = _window(target, start, len(grey))
        window[:] = grey
        window.flush()
        del window
        sha1.extend(hashlib.sha1(row.tobytes()).hexdigest() for row in grey)
        start += len(grey)
    return target, sha1

