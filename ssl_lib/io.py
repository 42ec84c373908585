"""Atomic file writes: a crash or a kill never leaves a half-written output behind."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary file lives in the same directory so that the final ``os.replace`` is atomic.
    The suffix is kept so that libraries which infer a format from the extension still work.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".tmp" + target.suffix,
                                    dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600; outputs should get the usual permissions
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | os.PathLike[str], keep: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a fresh temporary directory; it replaces ``path`` as a whole only if the block succeeds.

    ``keep``: files of the replaced directory that the block does not write (a tracked ``.gitignore`` beside DVC
    outputs), copied into the new one before the swap, so that no kill ever leaves them deleted. What a killed
    process left behind is put right first (``recover_dir``).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    # The pid in the name tells a later process whether its owner is still alive (recover_dir).
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        for name in keep:
            if (target / name).is_file() and not (tmp / name).exists():
                shutil.copy2(target / name, tmp / name)
        if target.exists():
            old = _old_dir(target)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)  # the previous version back where it was
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _old_dir(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def recover_dir(path: str | os.PathLike[str]) -> None:
    """Undo what a killed ``atomic_dir`` of ``path`` left: the previous version back in place if the kill came
    between the two renames of the swap, and the temporary directories of dead processes removed."""
    target = Path(path)
    old = _old_dir(target)
    if old.is_dir():
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)  # killed after the swap, before the clean-up
        else:
            os.replace(old, target)  # killed between the renames: the previous version is whole
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        pid = stale.name.removeprefix(f".{target.name}.").split(".", 1)[0]
        if stale.is_dir() and not (pid.isdigit() and process_alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` (of this machine) still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as pretty JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_torch(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` atomically and byte-reproducibly.

    Saving to a path makes torch name the archive's inner folder after the (random) temp file name;
    saving through a buffer keeps the bytes identical for identical tensors, so DVC sees no change.
    """
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
