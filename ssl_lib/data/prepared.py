"""The prepared dataset: the canonical on-disk form every later stage reads.

A directory with
  images.npy        uint8 (N, H, W, C), np.save format, memory-mappable
  pool_indices.npy  int64 indices of the non-test images: the self-supervised pretraining pool
  meta.json         class_names, shape, per-channel mean/std in [0, 1] over non-test images, source,
                    source_version, num_images, num_test, num_skipped, ...
  report.json       skipped: [{path, reason}], num_skipped
  manifest.csv      index, split, label, source_id, sha1 (sha1 of the image's raw bytes)
The same inputs always give byte-identical files, so DVC sees no change when nothing changed.
Only manifest.csv depends on the label budget: the other files are what pretraining reads, so a new
label budget leaves them byte-identical and DVC does not retrain the encoder.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..io import atomic_dir
from .errors import DataError
from .sources import RawDataset, load_source
from .splits import SPLITS, assign_splits, split_counts

FORMAT_VERSION = 1
IMAGES_FILE = "images.npy"
MANIFEST_FILE = "manifest.csv"
META_FILE = "meta.json"
REPORT_FILE = "report.json"
POOL_FILE = "pool_indices.npy"
MANIFEST_COLUMNS = ["index", "split", "label", "source_id", "sha1"]
_FIX = "run the ingest stage: dvc repro ingest"
_STATS_CHUNK = 4096  # images per chunk when computing mean/std, bounds memory on big datasets


def _dumps(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 ``images`` (N, H, W, C), in [0, 1] units.

    Exact integer sums make the result independent of float summation order, so meta.json is
    byte-identical on any machine.
    """
    channels = images.shape[-1]
    total = [0] * channels
    total_sq = [0] * channels
    for start in range(0, len(images), _STATS_CHUNK):
        chunk = np.asarray(images[start:start + _STATS_CHUNK], dtype=np.int64).reshape(-1, channels)
        for ch in range(channels):
            total[ch] += int(chunk[:, ch].sum())
            total_sq[ch] += int(np.dot(chunk[:, ch], chunk[:, ch]))
    count = int(np.prod(images.shape[:-1], dtype=np.int64))
    if count == 0:
        return [0.0] * channels, [0.0] * channels
    means = [round(s / count / 255.0, 6) for s in total]
    # Var * count^2 in integers: exact, never negative.
    stds = [round(float(np.sqrt((q * count - s * s) / (count * count))) / 255.0, 6)
            for s, q in zip(total, total_sq)]
    return means, stds


def write_prepared(out_dir: str | os.PathLike[str], raw: RawDataset, splits: np.ndarray) -> dict[str, Any]:
    """Write ``raw`` with its ``splits`` as a prepared dataset in ``out_dir`` (replaced atomically).

    Returns the meta dict that was written to meta.json.
    """
    splits = np.asarray(splits).astype(str)
    # ``splits`` come from assign_splits, never from the user: a mismatch is a caller's bug.
    if splits.shape != (len(raw.images),):
        raise ValueError(f"got {splits.shape[0] if splits.ndim else 0} split names for "
                         f"{len(raw.images)} images; compute them with assign_splits on the same data")
    unknown = sorted(set(splits.tolist()) - set(SPLITS))
    if unknown:
        raise ValueError(f"unknown split names {unknown}; use only {', '.join(SPLITS)}")

    images = np.ascontiguousarray(raw.images, dtype=np.uint8)
    manifest = pd.DataFrame({
        "index": np.arange(len(images), dtype=np.int64),
        "split": splits,
        "label": np.asarray(raw.labels, dtype=np.int64),
        "source_id": list(raw.source_ids),
        "sha1": [hashlib.sha1(img.tobytes()).hexdigest() for img in images],
    }, columns=MANIFEST_COLUMNS)

    non_test = splits != "test"
    # Normalisation must not peek at test pixels; a test-only source falls back to all images.
    stats_images = images[non_test] if non_test.any() else images
    mean, std = channel_stats(stats_images)
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "class_names": list(raw.class_names),
        "num_classes": len(raw.class_names),
        "shape": [int(d) for d in images.shape[1:]],
        "mean": mean,
        "std": std,
        "source": raw.source,
        "source_version": raw.source_version,
        "num_images": int(len(images)),
        "num_test": int((~non_test).sum()),
        "num_skipped": len(raw.skipped),
    }
    report = {
        "skipped": [{"path": path, "reason": reason} for path, reason in raw.skipped],
        "num_skipped": len(raw.skipped),
    }

    with atomic_dir(out_dir) as tmp:
        # mkdtemp makes the directory 0700; give it normal permissions so others can read it.
        os.chmod(tmp, 0o755)
        np.save(tmp / IMAGES_FILE, images, allow_pickle=False)
        np.save(tmp / POOL_FILE, np.flatnonzero(non_test).astype(np.int64), allow_pickle=False)
        manifest.to_csv(tmp / MANIFEST_FILE, index=False, lineterminator="\n")
        (tmp / META_FILE).write_text(_dumps(meta))
        (tmp / REPORT_FILE).write_text(_dumps(report))
    return {**meta, "split_counts": split_counts(splits)}


@dataclass(frozen=True, eq=False)  # eq=False: arrays and DataFrames have no plain ==
class PreparedDataset:
    """A loaded prepared dataset; ``images`` is a read-only memmap."""

    images: np.ndarray
    manifest: pd.DataFrame
    meta: dict[str, Any]

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    def indices(self, name: str) -> np.ndarray:
        """Row indices of split ``name``, ascending."""
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; use one of {', '.join(SPLITS)}")
        return np.flatnonzero(self.manifest["split"].to_numpy() == name)

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(images, labels) of split ``name``, in manifest order; images are an in-memory copy."""
        idx = self.indices(name)
        return np.asarray(self.images[idx]), self.manifest["label"].to_numpy(dtype=np.int64)[idx]

    def pretrain_pool(self) -> np.ndarray:
        """Images of every non-test split (unlabeled + labeled + val): the self-supervised pool."""
        idx = np.flatnonzero(self.manifest["split"].to_numpy() != "test")
        return np.asarray(self.images[idx])


def load_prepared(path: str | os.PathLike[str]) -> PreparedDataset:
    """Open the prepared dataset in ``path``; DataError if it is missing, partial or inconsistent."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"prepared dataset {root} does not exist; {_FIX}")
    missing = [f for f in (IMAGES_FILE, MANIFEST_FILE, META_FILE) if not (root / f).is_file()]
    if missing:
        raise DataError(f"prepared dataset {root} lacks {', '.join(missing)}; {_FIX}")
    try:
        meta = json.loads((root / META_FILE).read_text())
        manifest = pd.read_csv(root / MANIFEST_FILE, keep_default_na=False,
                               dtype={"split": str, "source_id": str, "sha1": str, "label": np.int64,
                                      "index": np.int64})
        images = np.load(root / IMAGES_FILE, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, TypeError, pd.errors.ParserError) as exc:
        raise DataError(f"prepared dataset {root} is corrupt ({type(exc).__name__}: {exc}); {_FIX}") from exc

    problems = []
    if not isinstance(meta, dict) or not {"class_names", "shape", "num_images"} <= meta.keys():
        problems.append("meta.json lacks class_names/shape/num_images")
    elif meta["num_images"] != len(images) or list(meta["shape"]) != list(images.shape[1:]):
        problems.append(f"meta.json says {meta['num_images']} x {meta['shape']} but images.npy is "
                        f"{list(images.shape)}")
    if list(manifest.columns) != MANIFEST_COLUMNS:
        problems.append(f"manifest.csv columns are {list(manifest.columns)}, expected {MANIFEST_COLUMNS}")
    elif len(manifest) != len(images):
        problems.append(f"manifest.csv has {len(manifest)} rows but images.npy has {len(images)} images")
    elif not set(manifest["split"]) <= set(SPLITS):
        problems.append(f"manifest.csv has unknown splits {sorted(set(manifest['split']) - set(SPLITS))}")
    if images.dtype != np.uint8 or images.ndim != 4:
        problems.append(f"images.npy is {images.dtype} {images.shape}, expected uint8 (N, H, W, C)")
    if problems:
        raise DataError(f"prepared dataset {root} is inconsistent: {'; '.join(problems)}; {_FIX}")
    return PreparedDataset(images=images, manifest=manifest, meta=meta)


def load_pool(path: str | os.PathLike[str], in_memory: bool = True) -> tuple[Any, dict[str, Any]]:
    """The pretraining pool (non-test images, uint8 NHWC) and meta.json.

    Reads only the files that do not depend on the label budget (see the module docstring). With
    ``in_memory=False`` the images stay memory-mapped and rows are read on demand (``IndexedRows``).
    """
    root = Path(path)
    missing = [f for f in (IMAGES_FILE, POOL_FILE, META_FILE) if not (root / f).is_file()]
    if missing:
        raise DataError(f"prepared dataset {root} lacks {', '.join(missing)}; {_FIX}")
    try:
        meta = json.loads((root / META_FILE).read_text())
        images = np.load(root / IMAGES_FILE, mmap_mode="r", allow_pickle=False)
        indices = np.load(root / POOL_FILE, allow_pickle=False)
        if not in_memory:
            from ssl_lib.batches import IndexedRows

            if len(indices) and (indices.min() < 0 or indices.max() >= len(images)):
                raise IndexError(f"pool indices outside the {len(images)} images")
            return IndexedRows(images, indices), meta
        return np.asarray(images[indices]), meta
    except (OSError, ValueError, IndexError) as exc:
        raise DataError(f"prepared dataset {root} is corrupt ({type(exc).__name__}: {exc}); {_FIX}") from exc


def ingest(source: str, path: str | os.PathLike[str] | None, seed: int,
           labels_per_class: int | None, label_fraction: float | None, val_per_class: int,
           test_fraction: float, out_dir: str | os.PathLike[str], *,
           image_size: int | tuple[int, int] | None = None) -> dict[str, Any]:
    """Load ``source``, assign splits and write the prepared dataset to ``out_dir``.

    Returns the meta dict plus ``skipped`` ([(path, reason), ...], the same list as report.json)
    so callers can log what was left out.
    """
    raw = load_source(source, path, image_size=image_size)
    splits = assign_splits(raw.labels, raw.predefined_test, seed, labels_per_class, label_fraction,
                           val_per_class, test_fraction, class_names=raw.class_names)
    meta = write_prepared(out_dir, raw, splits)
    return {**meta, "skipped": list(raw.skipped)}
