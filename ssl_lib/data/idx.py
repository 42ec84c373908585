"""Read and write IDX files (the MNIST / Fashion-MNIST container), plain or gzip-compressed.

We parse IDX ourselves instead of going through torchvision: Debian's dataset-fashion-mnist
recompressed the .gz files, so torchvision's MD5 checks reject perfectly good data.
"""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from .errors import DataError

# IDX type codes -> big-endian numpy dtypes (the format is always big-endian).
_DTYPES: dict[int, str] = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_CODES: dict[str, int] = {f"{np.dtype(v).kind}{np.dtype(v).itemsize}": k for k, v in _DTYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    # Sniff the content rather than trusting the extension: people gunzip files and keep names.
    with open(path, "rb") as fh:
        data = fh.read()
    if not data.startswith(_GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path} is a corrupt or truncated gzip file ({exc}); "
                        "replace it with an intact copy") from exc


def read_idx(path: str | os.PathLike[str], expected_ndim: int | None = None) -> np.ndarray:
    """Return the array stored in the IDX file ``path`` (native byte order).

    Raises DataError naming the file if it is missing, not IDX, truncated, has trailing bytes,
    or does not have ``expected_ndim`` dimensions.
    """
    path = Path(path)
    try:
        data = _read_bytes(path)
    except FileNotFoundError as exc:
        raise DataError(f"IDX file {path} does not exist; point data.path at the directory that holds it") from exc
    except OSError as exc:
        raise DataError(f"cannot read IDX file {path} ({exc}); check its permissions") from exc

    fix = "replace it with an intact copy"
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {data[:4].hex() or 'empty'}); {fix}")
    code, ndim = data[2], data[3]
    if expected_ndim is not None and ndim != expected_ndim:
        raise DataError(f"{path} has {ndim} dimensions, expected {expected_ndim}; "
                        f"is it the wrong file (images vs labels)? {fix}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated inside its header; {fix}")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_DTYPES[code])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise DataError(f"{path} is {what}: {len(data)} bytes, header {shape} implies {expected}; {fix}")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write ``array`` as IDX; gzip-compressed (reproducibly, mtime 0) if ``path`` ends in .gz."""
    array = np.asarray(array)
    key = f"{array.dtype.kind}{array.dtype.itemsize}"
    if key not in _CODES:  # the caller's array, not the user's data: a plain ValueError
        raise ValueError(f"IDX cannot store dtype {array.dtype}; use one of uint8, int8, int16, "
                         "int32, float32, float64")
    code = _CODES[key]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(array, dtype=_DTYPES[code]).tobytes()
    if str(path).endswith(".gz"):
        payload = gzip.compress(payload, mtime=0)
    Path(path).write_bytes(payload)
