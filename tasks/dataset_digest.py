"""The dataset's version as DVC recorded it: one digest over the ingest stage's md5s of the prepared images and
manifest (the ``sslpipe.dataset_hash`` tag of runs and model versions)."""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import yaml

from tasks import paths
from tasks.environment import project_root

DATASET_FILES = ("images.npy", "manifest.csv")


def dataset_hash(root: Path | None = None) -> str | None:
    """A digest of the md5s DVC recorded in dvc.lock for the prepared images and manifest, once ingest ran."""
    lock = (root or project_root()) / "dvc.lock"
    try:
        stat = lock.stat()
    except FileNotFoundError:
        return None
    # A stage tags several runs with it: parse each state of the lock once (it is re-read when DVC rewrites it).
    return _hash_of_lock(lock, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _hash_of_lock(lock: Path, mtime_ns: int, size: int) -> str | None:
    try:
        # libyaml's loader when PyYAML has it: the pure-Python one takes ~0.1 s on a pipeline's lock.
        stages = (yaml.load(lock.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}).get(
            "stages", {})
    except (OSError, yaml.YAMLError):
        return None
    # The dataset is the images plus their manifest: one digest over both of DVC's md5s.
    md5s = {out.get("path"): out.get("md5") for out in stages.get("ingest", {}).get("outs", [])}
    parts = [md5s.get(f"{paths.PREPARED.as_posix()}/{name}") for name in DATASET_FILES]
    if not all(parts):
        return None
    return hashlib.md5(":".join(parts).encode()).hexdigest()
