"""One run per checkout at a time: the lock `sslpipe run`, `sweep`, `stage` and the flows take before they touch
params.yaml or start DVC.

Two runs in one checkout record the wrong parameters: the second rewrites params.yaml under the first, whose
stages, dvc.lock and DVC experiment then use them while its MLflow run states its own. The lock is ``flock(2)``
on ``.dvc/tmp/sslpipe-run.lock`` (git-ignored with the rest of ``.dvc/tmp``, where DVC keeps its own lock), so
the kernel releases it when its process ends, however it ends: a ``kill -9`` leaves no stale lock to clean up.
The file says who holds it, for the one line of whoever finds it taken. Not stage work: no stage imports this.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from ssl_lib.errors import UserError

LOCK_FILE = Path(".dvc/tmp/sslpipe-run.lock")
# Set by the holder for everything it starts: a stage process, however it was started (by DVC, by a flow in a
# worker's subprocess), belongs to the run that holds the checkout when it carries the holder's pid.
HOLDER_ENV = "SSLPIPE_CHECKOUT_HOLDER"
# Checkouts this process holds, by resolved root, with how deep: a flow inside a command (or the pipeline flow
# inside the retrain flow) takes the lock its caller already holds. A second flock from the same process would
# fail on itself: locks belong to open files, not processes.
_HELD: dict[str, int] = {}


class CheckoutBusy(UserError):
    """Another run holds this checkout; the message says which (pid, command, since when)."""


def lock_path(root: Path) -> Path:
    """Where the lock of the checkout at ``root`` lives: under DVC's own scratch folder, or at the root of a
    folder that is not a DVC project yet (a run there fails later, at DVC, with its own message)."""
    return root / LOCK_FILE if (root / ".dvc").is_dir() else root / f".{LOCK_FILE.name}"


@contextmanager
def hold_checkout(root: str | os.PathLike[str], command: str | None = None) -> Iterator[None]:
    """Hold the checkout at ``root`` for this block, or raise CheckoutBusy at once if another process holds it.

    ``command`` is how the holder is named to others (default: this process's command line).
    """
    key = str(Path(root).resolve())
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    path = lock_path(Path(key))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by the processes a run starts (PEP 446)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise CheckoutBusy(_busy_message(path, key)) from None
        holder = {"pid": os.getpid(), "command": command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                  "since": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        _HELD[key] = 1
        previous = os.environ.get(HOLDER_ENV)
        os.environ[HOLDER_ENV] = str(os.getpid())
        try:
            yield
        finally:
            del _HELD[key]
            if previous is None:
                os.environ.pop(HOLDER_ENV, None)
            else:
                os.environ[HOLDER_ENV] = previous
    finally:
        os.close(fd)  # releases the lock


def check_stage_may_run(root: str | os.PathLike[str]) -> None:
    """For a stage process: raise CheckoutBusy if a run other than the one that started it holds the checkout.

    A stage takes no lock of its own: the run that started it (a flow, `sslpipe stage`) holds it and handed its
    pid down in ``$SSLPIPE_CHECKOUT_HOLDER``, or none does (a plain `dvc repro`). So a `dvc repro` started beside a
    running flow stops at its first stage, before that stage reads the params the flow wrote for its own stages.
    """
    key = str(Path(root).resolve())
    path = lock_path(Path(key))
    if key in _HELD or not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # free: nobody holds it (released when fd closes)
            return
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
    finally:
        os.close(fd)
    holder = _holder(path).get("pid")
    if holder is None or str(holder) != os.environ.get(HOLDER_ENV):
        raise CheckoutBusy(_busy_message(path, key))


def _holder(path: Path) -> dict:
    """What the holder wrote into the lock file; {} when it has not written yet."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _busy_message(path: Path, root: str) -> str:
    holder = _holder(path)
    try:
        who = f"pid {holder['pid']} (`{holder['command']}`, since {holder['since']})"
    except KeyError:  # taken a moment ago, not written yet
        who = "another process"
    return (f"another run holds the checkout {root}: {who}; wait for it to end (or stop it), or run from another "
            "clone")
