"""Writing the prepared dataset: a raw source and its splits become the directory every later stage reads.

The format (file names, what each holds) is ``ssl_lib.data.prepared``'s; only the ingest stage writes it.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np
import pandas as pd

from ..io import atomic_dir
from .layout import (
    FORMAT_VERSION,
    IMAGES_FILE,
    MANIFEST_COLUMNS,
    MANIFEST_FILE,
    META_FILE,
    POOL_FILE,
    REPORT_FILE,
    SPLITS,
)
from .sources import RawDataset, load_source
from .splits import assign_splits, split_counts

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
            for s, q in zip(total, total_sq, strict=True)]
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
