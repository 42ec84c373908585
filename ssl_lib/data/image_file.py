"""images.npy written and read in blocks of rows, so memory stays flat whatever the number of images.

The file is preallocated (``np.lib.format.open_memmap``: the .npy header, then space for every row) and filled
block by block, in this process or in a pool of worker processes (one per core): each block of rows is
memory-mapped alone, files are decoded straight into it, and rows of a previous images.npy are copied into the
file by the kernel (``copy_file_range``), then the block is unmapped. Nothing ever holds more than one block:
a process's resident memory does not grow with the file, as it would through one map of the whole file, whose
touched pages all count as resident. Reading goes the same way, block by block into a reused buffer.
"""
from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .decode import is_colour, open_image, to_array
from .files import parallel_map, worth_a_pool

_BLOCK_BYTES = 8 << 20  # a block of rows is about this many bytes of pixels
_MAX_BLOCK_ROWS = 1024
_SQUARED_AT_ONCE = 1 << 22  # pixel values squared at a time by pixel_sums
# Fewer files than this, of fewer bytes than the next, decode in this process: starting worker processes (an
# interpreter and imports each, over half a second) costs more than it saves. A 96x96 PNG (the ingest benchmark's)
# decodes in about 0.4 ms, so two workers only pay off from about 3,000 of them; a large photo takes far longer,
# hence the bytes too. A re-ingest after 1 % new images of 100,000 decodes in this process.
MIN_PARALLEL_DECODES = 4000
MIN_PARALLEL_DECODE_BYTES = 64 << 20


@dataclass(frozen=True)
class OldRows:
    """Where the rows of a uint8 .npy file are."""

    path: str
    offset: int                  # bytes before the first row (the .npy header)
    shape: tuple[int, ...]       # of one row: (H, W, C)


@dataclass(frozen=True)
class PixelSums:
    """Exact per-channel sums of pixel values and of their squares, over ``count`` pixels (per channel).

    Integers, so adding and removing images in any order gives the same result: meta.json's mean and std come
    out byte-identical on any machine, and a re-ingest can update the previous version's sums instead of
    reading every image again.
    """

    count: int
    total: tuple[int, ...]
    total_sq: tuple[int, ...]

    @classmethod
    def zero(cls, channels: int) -> PixelSums:
        return cls(0, (0,) * channels, (0,) * channels)

    def __add__(self, other: PixelSums) -> PixelSums:
        return PixelSums(self.count + other.count, tuple(a + b for a, b in zip(self.total, other.total, strict=True)),
                         tuple(a + b for a, b in zip(self.total_sq, other.total_sq, strict=True)))

    def times(self, weight: int) -> PixelSums:
        return PixelSums(self.count * weight, tuple(v * weight for v in self.total),
                         tuple(v * weight for v in self.total_sq))

    def first_channel(self) -> PixelSums:
        """The sums of channel 0 alone: those of grey images stored as one channel instead of three equal ones."""
        return PixelSums(self.count, self.total[:1], self.total_sq[:1])


def pixel_sums(blocks: Iterable[np.ndarray], channels: int) -> PixelSums:
    """The PixelSums of uint8 image blocks (each (n, H, W, C)); temporaries are a small multiple of one block."""
    total = np.zeros(channels, dtype=np.uint64)
    total_sq = np.zeros(channels, dtype=np.uint64)
    count = 0
    squares_buffer: np.ndarray | None = None  # one buffer, however many blocks
    for block in blocks:
        # Reduce over images, each a row of H*W*C values: long contiguous adds, then the few per-channel sums.
        rows = np.asarray(block).reshape(len(block), -1)
        if not rows.size:
            continue
        total += rows.sum(axis=0, dtype=np.uint64).reshape(-1, channels).sum(axis=0)
        if squares_buffer is None or squares_buffer.shape[1] != rows.shape[1]:
            squares_buffer = np.empty((max(1, _SQUARED_AT_ONCE // rows.shape[1]), rows.shape[1]), dtype=np.uint16)
        for start in range(0, len(rows), len(squares_buffer)):
            part = rows[start:start + len(squares_buffer)]
            squares = np.square(part, out=squares_buffer[:len(part)], dtype=np.uint16)  # 255**2 fits in 16 bits
            total_sq += squares.sum(axis=0, dtype=np.uint64).reshape(-1, channels).sum(axis=0)
        count += rows.size // channels
    return PixelSums(count, tuple(int(v) for v in total), tuple(int(v) for v in total_sq))


class Reuse(NamedTuple):
    """An item of ``fill``: copy ``row`` of the previous images.npy; ``sha1`` of its pixels if known (else "")."""

    row: int
    sha1: str


@dataclass(frozen=True)
class FillResult:
    sha1: list[str]              # of each written row's pixel bytes ("" for a failed row)
    colour: bool                 # some row holds colour (decode.is_colour)
    failed: dict[int, str]       # row -> why its file could not be decoded
    decoded_sums: PixelSums      # over the decoded rows that were asked to be counted


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


def _read_into(fd: int, target: memoryview, offset: int) -> None:
    done = 0
    while done < len(target):  # a read may return less than asked
        got = os.preadv(fd, [target[done:]], offset + done)
        if not got:
            raise ValueError("the previous images.npy is shorter than its header says")
        done += got


def _copy_run(old_fd: int, old: OldRows, first: int, target_fd: int, target: OldRows, start: int,
              window: np.ndarray) -> None:
    """Rows ``first..`` of ``old`` into rows ``start..`` of ``target`` (``window`` maps those rows).

    The kernel copies the bytes file to file where it can; grey rows going into an RGB file are replicated.
    """
    source = old.offset + first * _row_bytes(old.shape)
    if window.shape[1:] != old.shape:
        grey = np.empty((len(window), *old.shape), dtype=np.uint8)
        _read_into(old_fd, grey.reshape(-1).data, source)
        window[:] = grey  # broadcasts the one channel over three
        return
    size, done = len(window) * _row_bytes(old.shape), 0
    destination = target.offset + start * _row_bytes(target.shape)
    try:
        while done < size:
            got = os.copy_file_range(old_fd, target_fd, size - done, source + done, destination + done)
            if not got:
                raise OSError("copy_file_range copied nothing")
            done += got
    except (OSError, AttributeError):  # not Linux, or a file system that cannot: read through the window
        _read_into(old_fd, window.reshape(-1).data[done:], source + done)


_Job = tuple[OldRows, int, list["str | Reuse"], list[bool], str, tuple[int, int], "OldRows | None"]


def _fill_block(job: _Job) -> FillResult:
    """Fill rows ``start..`` of ``target``: a str item is an image file to decode, a Reuse a row of ``old``."""
    target, start, items, count, mode, size_wh, old = job
    window = _window(target, start, len(items))
    sha1: list[str] = []
    colour = False
    failed: dict[int, str] = {}
    decoded: list[int] = []  # rows of this block decoded here and to be counted in the sums
    with open(target.path, "r+b", buffering=0) as target_file, \
            open(old.path if old is not None else os.devnull, "rb", buffering=0) as old_file:
        i = 0
        while i < len(items):
            item = items[i]
            if isinstance(item, str):
                try:
                    pixels = np.ascontiguousarray(to_array(open_image(item), mode, size_wh))
                except Exception as exc:  # PIL raises many types for bad files; reported, never fatal
                    failed[start + i] = f"not a readable image: {type(exc).__name__}: {exc}"
                    sha1.append("")
                else:
                    window[i] = pixels
                    sha1.append(hashlib.sha1(pixels.data).hexdigest())
                    colour = colour or is_colour(pixels)
                    if count[i]:
                        decoded.append(i)
                i += 1
                continue
            # Reused rows usually follow each other in the previous file too: copy each such run at once.
            run = [item]
            for following in itertools.islice(items, i + 1, None):
                if not isinstance(following, Reuse) or following.row != run[-1].row + 1:
                    break
                run.append(following)
            end = i + len(run)
            assert old is not None
            _copy_run(old_file.fileno(), old, item.row, target_file.fileno(), target, start + i, window[i:end])
            same = old.shape == target.shape
            sha1.extend(r.sha1 if same and r.sha1 else hashlib.sha1(window[k].data).hexdigest()
                        for k, r in zip(range(i, end), run, strict=True))
            # Row by row, to stop at the first colour row: a whole block at once compares megabytes.
            colour = colour or any(is_colour(window[k]) for k in range(i, end))
            i = end
        sums = pixel_sums([window[decoded]], target.shape[-1]) if decoded else PixelSums.zero(target.shape[-1])
    del window  # unmapped; the kernel writes the pages back in its own time (no msync: nothing needs them on disk)
    return FillResult(sha1, colour, failed, sums)


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0  # reported when it fails to decode


def fill(target: OldRows, items: Sequence[str | Reuse], *, mode: str, size_wh: tuple[int, int],
         count: Sequence[bool] | None = None, old: OldRows | None = None, workers: int = 1) -> FillResult:
    """Fill every row of ``target`` from ``items`` (file paths to decode, or rows of ``old`` to copy).

    ``count``: which rows the returned ``decoded_sums`` cover, if decoded (default all). ``workers`` > 1 runs the
    blocks in that many processes when the files to decode are at least ``MIN_PARALLEL_DECODES`` or
    ``MIN_PARALLEL_DECODE_BYTES``, else in threads (``files.parallel_map``); the result is the same as with one.
    """
    flags = [True] * len(items) if count is None else list(count)
    sizes = (_file_size(item) for item in items if isinstance(item, str))
    # One worker runs inline whatever the sizes: no file is stat'ed to decide.
    processes = workers > 1 and worth_a_pool(sizes, MIN_PARALLEL_DECODES, MIN_PARALLEL_DECODE_BYTES)
    step = block_rows(target.shape, len(items), workers)
    jobs: list[_Job] = [(target, start, list(items[start:start + step]), flags[start:start + step], mode, size_wh,
                         old) for start in range(0, len(items), step)]
    # Too few files for processes: threads, which start at once and still overlap most of the decoding.
    parts = parallel_map(_fill_block, jobs, workers, processes=processes)
    sums = PixelSums.zero(target.shape[-1])
    for part in parts:
        sums = sums + part.decoded_sums
    return FillResult(sha1=[s for p in parts for s in p.sha1], colour=any(p.colour for p in parts),
                      failed={row: why for p in parts for row, why in p.failed.items()}, decoded_sums=sums)


def write_array(target: OldRows, images: np.ndarray) -> list[str]:
    """Copy in-memory ``images`` into ``target`` block by block; returns each row's sha1."""
    sha1: list[str] = []
    step = block_rows(target.shape, len(images))
    for start in range(0, len(images), step):
        block = np.ascontiguousarray(images[start:start + step], dtype=np.uint8)
        window = _window(target, start, len(block))
        window[:] = block
        del window
        sha1.extend(hashlib.sha1(row.data).hexdigest() for row in block)
    return sha1


def iter_blocks(source: OldRows, count: int, rows: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """The rows of ``source`` (all ``count``, or those in sorted ``rows``) in blocks read into reused buffers.

    Each block is only valid until the next one is read.
    """
    step = block_rows(source.shape, count)
    size = _row_bytes(source.shape)
    buffer = np.empty((step, *source.shape), dtype=np.uint8)
    picked_buffer = np.empty_like(buffer) if rows is not None else buffer  # reused, as the buffer is
    with open(source.path, "rb", buffering=0) as f:
        for start in range(0, count, step):
            n = min(step, count - start)
            if rows is not None:
                picked = rows[(rows >= start) & (rows < start + n)] - start
                if not len(picked):
                    continue  # nothing wanted here: not even read
            view = buffer[:n]
            _read_into(f.fileno(), view.reshape(-1).data, source.offset + start * size)
            if rows is None:
                yield view
            else:
                yield np.take(view, picked, axis=0, out=picked_buffer[:len(picked)], mode="clip")  # "raise" copies


def compact_rows(target: OldRows, count: int, keep: np.ndarray) -> int:
    """Remove the rows of ``target`` where ``keep`` is False and cut the file after the rest; returns their count.

    Only the file's length changes, not its .npy header (``resize`` sets it). Rows before the first removed one
    are neither read nor written.
    """
    kept = np.flatnonzero(keep)
    if len(kept) == count:
        return count
    size = _row_bytes(target.shape)
    step = block_rows(target.shape, count)
    first = int(np.flatnonzero(~np.asarray(keep, dtype=bool))[0])
    with open(target.path, "r+b", buffering=0) as f:
        # Rows only move down and blocks go in order, so a block never overwrites a row not yet moved.
        for dst in range(first, len(kept), step):
            sources = kept[dst:dst + step]
            data = b"".join(os.pread(f.fileno(), size, target.offset + int(s) * size) for s in sources)
            os.pwrite(f.fileno(), data, target.offset + dst * size)
        f.truncate(target.offset + len(kept) * size)
    return len(kept)


def _header(offset: int, shape: tuple[int, ...]) -> bytes:
    import io

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    if header.tell() != offset:  # headers leave room for the row count to grow to 21 digits (numpy's padding)
        raise ValueError(f"new .npy header is {header.tell()} bytes, the file's is {offset}")
    return header.getvalue()


def can_resize(rows: OldRows, count: int) -> bool:
    """Whether the header of ``rows``'s .npy file can say ``count`` rows without moving them (same header length)."""
    try:
        _header(rows.offset, (count, *rows.shape))
    except ValueError:
        return False
    return True


def resize(rows: OldRows, count: int) -> None:
    """Make the .npy file of ``rows`` hold ``count`` rows in place: its length cut (or zero-extended) to them and
    its header rewritten. The header goes last, so until then readers see the rows the file held before."""
    with open(rows.path, "r+b", buffering=0) as f:
        f.truncate(rows.offset + count * _row_bytes(rows.shape))
        f.seek(0)
        f.write(_header(rows.offset, (count, *rows.shape)))


def extend(rows: OldRows, count: int, more: int) -> OldRows:
    """Room for ``more`` rows after the first ``count`` rows of ``rows``'s .npy file; returns where they go.

    The header is left as it is (``resize`` sets it once the rows are there), so a reader of the file still sees
    its ``count`` rows and nothing after them. Bytes after those rows (left by an interrupted run) are cut first.
    """
    size = _row_bytes(rows.shape)
    with open(rows.path, "r+b", buffering=0) as f:
        f.truncate(rows.offset + count * size)
        f.truncate(rows.offset + (count + more) * size)
    return OldRows(rows.path, rows.offset + count * size, rows.shape)


def narrow_channels(source: OldRows, count: int, target_path: str | os.PathLike[str]) -> tuple[OldRows, list[str]]:
    """Copy ``source``'s rows keeping only the first channel (grey images decoded as RGB); returns the copy's sha1s."""
    target = create(target_path, (count, *source.shape[:-1], 1))
    sha1: list[str] = []
    start = 0
    for block in iter_blocks(source, count):
        grey = np.ascontiguousarray(block[..., :1])
        window = _window(target, start, len(grey))
        window[:] = grey
        del window
        sha1.extend(hashlib.sha1(row.data).hexdigest() for row in grey)
        start += len(grey)
    return target, sha1
