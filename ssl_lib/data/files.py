"""A folder's image files, identified without decoding them: listing, content hashes and image headers.

Each file is read once for its sha256 and its header (size, mode). Those are cached by file metadata (size,
mtime, inode), as DVC caches its own hashes, so listing an unchanged folder of 100,000 files costs a ``stat``
per file, not a read.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import multiprocessing
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import NamedTuple, TypeVar

from .decode import probe

log = logging.getLogger("ssl_lib.data.files")
J = TypeVar("J")
R = TypeVar("R")

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
_CACHE_FORMAT = 2
_CHUNK = 256  # files per worker task
# Fewer files to read than this, of fewer bytes than the next, are read in this process: starting worker
# processes (an interpreter and imports each, over half a second) costs more than it saves. Reading, hashing and
# probing a 27 KB PNG (the ingest benchmark's) takes about 60 us, so two workers only pay off from about 20,000 of
# them; large files take longer, hence the bytes too.
MIN_PARALLEL_READS = 20_000
MIN_PARALLEL_READ_BYTES = 512 << 20


# A NamedTuple, not a frozen dataclass: one of these per file, 100,000s of them built from the cache on every scan,
# and a tuple is built in half the time (0.15 s against 0.32 s for 100,000).
class FileRecord(NamedTuple):
    """One image file of a folder; ``error`` is why it cannot be used ("" when it can)."""

    rel: str          # POSIX path relative to the folder
    size: int
    mtime_ns: int
    inode: int
    sha256: str       # hex digest of the file's bytes; "" when unreadable
    width: int        # upright size and PIL mode from the header; 0, 0, "" when it is not an image
    height: int
    mode: str
    error: str


def default_workers() -> int:
    """One worker per core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def worth_a_pool(sizes: Iterable[int], min_count: int, min_bytes: int) -> bool:
    """Whether files of these sizes (bytes) are enough work for worker processes: at least ``min_count`` files or
    ``min_bytes`` in all. Stops taking sizes once they are, so a lazy ``sizes`` is read no further than needed."""
    count = total = 0
    for size in sizes:
        count += 1
        total += size
        if count >= min_count or total >= min_bytes:
            return True
    return False


def parallel_map(function: Callable[[J], R], jobs: Sequence[J], workers: int, *, processes: bool) -> list[R]:
    """``function`` over ``jobs``, results in order: in up to ``workers`` worker processes when ``processes``, else in
    threads (which start at once: for a few files, where PIL, zlib and hashlib release the GIL for most of the
    work); in this thread for one worker or one job.

    Processes are spawned, not forked: the caller may hold threads (MLflow's) whose locks a forked child would
    inherit. So ``function`` and the jobs must pickle, and a script that gets here needs the usual
    ``if __name__ == "__main__":`` guard.
    """
    workers = min(workers, len(jobs))
    if workers <= 1:
        return [function(job) for job in jobs]
    pool: Executor = (ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
                      if processes else ThreadPoolExecutor(max_workers=workers))
    with pool:
        return list(pool.map(function, jobs))


def walk_images(root: Path) -> list[str]:
    """Relative POSIX paths of image files under ``root``, sorted; hidden entries are ignored."""
    found: list[str] = []
    # Plain strings, not pathlib: this runs once per file of folders with 100,000s of them.
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        prefix = "" if rel_dir == "." else rel_dir + "/"
        for name in filenames:
            dot = name.rfind(".")  # os.path.splitext's extension, without its cost per file
            if dot > 0 and not name.startswith(".") and name[dot:].lower() in IMAGE_EXTENSIONS:
                found.append(prefix + name)
    return sorted(found)


def _read(root: Path, rel: str, st: os.stat_result) -> FileRecord:
    meta = (rel, st.st_size, st.st_mtime_ns, st.st_ino)
    path = os.path.join(root, rel)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        return FileRecord(*meta, sha256="", width=0, height=0, mode="", error=f"unreadable: {exc}")
    digest = hashlib.sha256(data).hexdigest()
    try:
        width, height, mode = probe(data, root / rel)  # names the file as Path(root) / rel, as decoding does
    except Exception as exc:  # PIL raises many types for bad files (OSError, SyntaxError, ...)
        return FileRecord(*meta, sha256=digest, width=0, height=0, mode="",
                          error=f"not a readable image: {type(exc).__name__}: {exc}")
    return FileRecord(*meta, sha256=digest, width=width, height=height, mode=mode, error="")


def _read_chunk(root: Path, part: list[tuple[str, os.stat_result]]) -> list[FileRecord]:
    return [_read(root, rel, st) for rel, st in part]


def _cache_key(root: Path) -> str:
    import PIL

    # Headers are read by PIL: another release may read them differently.
    return json.dumps({"format": _CACHE_FORMAT, "root": str(root.resolve()), "pillow": PIL.__version__})


class _HashCache:
    """Records of a folder's files by path, kept in SQLite (as DVC keeps its own hash state), so that a scan writes
    only what changed: a folder that grew by 1,000 files of 100,000 upserts 1,000 rows instead of rewriting all.

    Every failure to read it (damaged, another format, written for another folder or Pillow release) only costs a
    re-read of the files: the cache starts empty.
    """

    _COLUMNS = "rel, size, mtime_ns, inode, sha256, width, height, mode, error"

    def __init__(self, path: Path, root: Path) -> None:
        self.path, self.key = path, _cache_key(root)

    def load(self) -> dict[str, FileRecord]:
        if not self.path.is_file():
            return {}
        try:
            with closing(sqlite3.connect(self.path)) as db:
                (key,) = db.execute("SELECT value FROM meta WHERE name = 'key'").fetchone()
                if key != self.key:
                    return {}
                rows = db.execute(f"SELECT {self._COLUMNS} FROM files").fetchall()
        except (sqlite3.Error, TypeError, ValueError):
            return {}
        # tuple.__new__ called from C builds each record without a Python frame: FileRecord._make costs twice as much.
        records: Iterator[FileRecord] = map(functools.partial(tuple.__new__, FileRecord), rows)
        return {record.rel: record for record in records}

    def update(self, loaded: dict[str, FileRecord], records: list[FileRecord]) -> None:
        """Make the cache hold ``records`` (unreadable files left out), given that it holds ``loaded``."""
        keep = [r for r in records if not r.error.startswith("unreadable")]
        # A record reused from the cache is the very object loaded: identity, not a field-by-field comparison.
        changed = [tuple(r) for r in keep if loaded.get(r.rel) is not r]
        removed = loaded.keys() - {r.rel for r in keep}
        if not changed and not removed:
            return
        try:
            if not loaded:  # new, or unusable: start the file afresh
                self.path.unlink(missing_ok=True)
            self._write(changed, removed)
        except (OSError, sqlite3.Error) as exc:  # the cache only saves time: a scan never fails for it
            log.warning("could not update the file-hash cache %s (%s); the next scan reads the files again",
                        self.path, exc)

    def _write(self, changed: list[tuple[object, ...]], removed: Iterable[str]) -> None:
        with closing(sqlite3.connect(self.path)) as db, db:  # one transaction: all of it or none
            db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT)")
            db.execute("INSERT OR REPLACE INTO meta VALUES ('key', ?)", (self.key,))
            db.execute("CREATE TABLE IF NOT EXISTS files (rel TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
                       "inode INTEGER, sha256 TEXT, width INTEGER, height INTEGER, mode TEXT, error TEXT)")
            db.executemany("DELETE FROM files WHERE rel = ?", [(rel,) for rel in removed])
            db.executemany(f"INSERT OR REPLACE INTO files ({self._COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           changed)


def _stat_all(root: Path, rels: list[str]) -> Iterator[tuple[str, os.stat_result | OSError]]:
    """``os.stat`` of each file (or why it failed), relative to an open directory where the platform allows: the
    kernel resolves the relative path, saving a path join per file (a third of the time for 100,000)."""
    fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if os.stat in os.supports_dir_fd else None
    try:
        for rel in rels:
            try:
                yield rel, os.stat(rel, dir_fd=fd) if fd is not None else os.stat(os.path.join(root, rel))
            except OSError as exc:
                yield rel, exc
    finally:
        if fd is not None:
            os.close(fd)


def scan_files(root: str | os.PathLike[str], cache_file: str | os.PathLike[str] | None = None,
               workers: int | None = None) -> list[FileRecord]:
    """Every image file under ``root`` (sorted by path) with its hash and header.

    Files whose size, mtime and inode match ``cache_file`` (SQLite) are not read again; what changed is written
    back to it. ``workers`` processes (None: one per core) read, hash and probe the files when there are
    at least ``MIN_PARALLEL_READS`` of them or ``MIN_PARALLEL_READ_BYTES`` (processes, since reading a header
    through PIL holds the GIL), fewer in threads. The records do not depend on ``workers``.
    """
    root = Path(root)
    cache = _HashCache(Path(cache_file), root) if cache_file is not None else None
    cached = cache.load() if cache is not None else {}
    records: dict[str, FileRecord] = {}
    todo: list[tuple[str, os.stat_result]] = []
    for rel, st_or_error in _stat_all(root, walk_images(root)):
        if isinstance(st_or_error, OSError):  # vanished or unreadable between listing and stat
            records[rel] = FileRecord(rel, 0, 0, 0, "", 0, 0, "", f"unreadable: {st_or_error}")
            continue
        st = st_or_error
        hit = cached.get(rel)
        if hit is not None and (hit.size, hit.mtime_ns, hit.inode) == (st.st_size, st.st_mtime_ns, st.st_ino):
            records[rel] = hit
        else:
            todo.append((rel, st))
    # Files go to the workers in chunks: one future per file would cost more memory than its record.
    chunks = [todo[i:i + _CHUNK] for i in range(0, len(todo), _CHUNK)]
    processes = worth_a_pool((st.st_size for _, st in todo), MIN_PARALLEL_READS, MIN_PARALLEL_READ_BYTES)
    for chunk in parallel_map(functools.partial(_read_chunk, root), chunks, workers or default_workers(),
                              processes=processes):
        records.update((record.rel, record) for record in chunk)
    result = [records[rel] for rel in sorted(records)]
    if cache is not None:
        cache.update(cached, result)
    return result


def folder_version(records: Iterable[FileRecord]) -> str:
    """The folder's content version: a digest of every readable file's path and content hash."""
    # One update over the joined parts: the same digest as one update per file, without a call per file.
    parts = b"".join([r.rel.encode() + b"\0" + bytes.fromhex(r.sha256) for r in records if r.sha256])
    return f"sha256:{hashlib.sha256(parts).hexdigest()}"
