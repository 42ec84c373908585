"""Writing the prepared dataset: a raw source and its splits become the directory every later stage reads.

The format (file names, what each holds) is ``ssl_lib.data.layout``'s; only the ingest stage writes it.

Ingest is incremental and streams. The prepared dataset already in ``out_dir`` is the previous data version:
its images whose file content (sha256) is unchanged are copied from its images.npy instead of decoded again,
its val and labeled images keep their roles (``splits.assign_splits``), and every image keeps the data version
at which it entered. New or changed files are decoded once each, in parallel, straight into a preallocated
images.npy (``image_file``); memory stays flat in the number of images. The whole directory is replaced
atomically, so a failure leaves the previous version as it was.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..io import atomic_dir
from . import image_file
from .errors import DataError
from .files import default_workers
from .layout import (
    FORMAT_VERSION,
    IMAGES_FILE,
    LINEAGE_FILE,
    MANIFEST_COLUMNS,
    MANIFEST_FILE,
    META_FILE,
    POOL_FILE,
    REPORT_FILE,
    read_manifest,
)
from .sources import FolderSource, RawDataset, SourceIndex, load_source
from .splits import assign_splits, split_counts


def _dumps(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def mean_std(sums: image_file.PixelSums) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units, from exact integer sums: the same on any machine."""
    channels, count = len(sums.total), sums.count
    if count == 0:
        return [0.0] * channels, [0.0] * channels
    means = [round(s / count / 255.0, 6) for s in sums.total]
    # Var * count^2 in integers: exact, never negative.
    stds = [round(float(np.sqrt((q * count - s * s) / (count * count))) / 255.0, 6)
            for s, q in zip(sums.total, sums.total_sq, strict=True)]
    return means, stds


# --------------------------------------------------------------------------- the previous version

@dataclass(frozen=True)
class _Previous:
    """The prepared dataset being replaced: what it held, by key."""

    lineage: dict[str, Any]
    rows: dict[str, int]                 # key -> row in its images.npy
    split: dict[str, tuple[str, int]]    # key -> (split, label)
    sha1: dict[str, str]                 # key -> sha1 of its pixels
    version: dict[str, int]              # key -> data version at which it entered
    by_source_id: dict[str, str]         # source_id -> key
    images: image_file.OldRows
    counted: np.ndarray                  # per row: in its pixel sums (a non-test image)


def _read_previous(out_dir: Path) -> _Previous | None:
    """The prepared dataset in ``out_dir``, or None if there is none this code can build on."""
    if not (out_dir / LINEAGE_FILE).is_file():
        return None  # none, or written before data versions existed: start a new lineage
    try:
        lineage = json.loads((out_dir / LINEAGE_FILE).read_text())
        m = read_manifest(out_dir / MANIFEST_FILE)
        images, count = image_file.open_rows(out_dir / IMAGES_FILE)
    except (OSError, ValueError, TypeError, pd.errors.ParserError):
        return None  # damaged: a fresh ingest replaces it
    if list(m.columns) != MANIFEST_COLUMNS or len(m) != count or not isinstance(lineage, dict):
        return None
    keys = m["key"].tolist()
    return _Previous(
        lineage=lineage,
        rows=dict(zip(keys, m["index"].tolist(), strict=True)),
        split={k: (s, int(y)) for k, s, y in zip(keys, m["split"].tolist(), m["label"].tolist(), strict=True)},
        sha1=dict(zip(keys, m["sha1"].tolist(), strict=True)),
        version=dict(zip(keys, m["version"].tolist(), strict=True)),
        by_source_id=dict(zip(m["source_id"].tolist(), keys, strict=True)),
        images=images,
        counted=m["split"].to_numpy() != "test",
    )


def _previous_roles(keys: list[str], labels: np.ndarray, previous: _Previous | None, seed: int) -> np.ndarray | None:
    """Each image's split in the previous version ("" if new), for assign_splits; None when there is nothing to keep.

    Roles drawn with another seed are not kept (a new seed asks for a new draw), nor the role of an image whose
    label changed (it counts as an old unlabeled image of its new class).
    """
    if previous is None or previous.lineage.get("seed") != seed:
        return None
    roles = np.full(len(keys), "", dtype="<U9")
    for i, (key, label) in enumerate(zip(keys, labels.tolist(), strict=True)):
        before = previous.split.get(key)
        if before is not None:
            roles[i] = before[0] if before[1] == label else "unlabeled"
    return roles


# --------------------------------------------------------------------------- pixels

@dataclass(frozen=True)
class _Pixels:
    images: image_file.OldRows
    count: int
    kept: np.ndarray          # bool per source image: written (False: its file failed to decode)
    sha1: list[str]           # per written row
    failed: list[tuple[str, str]]
    decode: dict[str, Any] | None
    reused: int
    decoded: int
    old_rows: np.ndarray      # per written row: the previous version's row it was copied from, or -1
    # PixelSums (in the written file's channels) over the decoded rows that fill was asked to count; None when
    # nothing was summed while writing (in-memory sources)
    decoded_sums: image_file.PixelSums | None
    copied_channels: int      # channels of the rows as they were copied (before any narrowing to grey)


def _write_pixels(target: Path, source: SourceIndex, previous: _Previous | None, workers: int,
                  count: np.ndarray) -> _Pixels:
    if isinstance(source, RawDataset):
        images = image_file.create(target, source.images.shape)
        sha1 = image_file.write_array(images, source.images)
        n = len(sha1)
        return _Pixels(images, n, np.ones(n, bool), sha1, [], None, 0, n, np.full(n, -1), None, images.shape[-1])
    if not isinstance(source, FolderSource):
        raise TypeError(f"cannot write pixels of a {type(source).__name__}")

    width, height = source.size_wh
    decode = {"mode": source.decode_mode, "size": [width, height]}
    channels = 3 if source.decode_mode == "RGB" else 1
    # Rows of the previous images.npy are reusable when its files were decoded the same way.
    old = previous if previous is not None and previous.lineage.get("decode") == decode else None
    # Their pixels' sha1 carries over when the rows are copied unchanged (same channels).
    carry_sha1 = old is not None and old.images.shape[-1] == channels
    items: list[str | image_file.Reuse] = []
    for key, record in zip(source.identities, source.records, strict=True):
        row = old.rows.get(key) if old is not None else None
        if row is None:
            items.append(os.path.join(source.root, record.rel))
        else:
            items.append(image_file.Reuse(row, old.sha1[key] if old is not None and carry_sha1 else ""))
    n = len(items)
    old_rows = np.array([item.row if isinstance(item, image_file.Reuse) else -1 for item in items], dtype=np.int64)
    reused = int((old_rows >= 0).sum())
    images = image_file.create(target, (n, height, width, channels))
    result = image_file.fill(images, items, mode=source.decode_mode, size_wh=source.size_wh, count=count.tolist(),
                             old=old.images if old is not None else None, workers=workers)
    kept = np.ones(n, dtype=bool)
    kept[list(result.failed)] = False
    failed = [(source.source_ids[row], why) for row, why in sorted(result.failed.items())]
    written = image_file.drop_rows(images, n, kept)
    sha1 = [s for s, k in zip(result.sha1, kept, strict=True) if k]
    sums = result.decoded_sums
    if channels == 3 and not result.colour:
        # Every image turned out grey: store one channel, as a folder of grey files would be.
        narrowed = target.with_name(f".{target.name}.grey")
        grey, sha1 = image_file.narrow_channels(images, written, narrowed)
        os.replace(narrowed, target)
        images = image_file.OldRows(str(target), grey.offset, grey.shape)
        sums = sums.first_channel()  # grey rows: three equal channels
    return _Pixels(images, written, kept, sha1, failed, decode, reused, n - reused, old_rows[kept], sums, channels)


def _non_test_sums(pixels: _Pixels, counted: np.ndarray, previous: _Previous | None) -> image_file.PixelSums:
    """PixelSums over the written rows where ``counted``, reading as few rows as it can.

    Decoded rows were summed while written. Rows copied from the previous version are not read again: the
    previous version's sums (lineage.json) are corrected by the few rows whose membership changed (removed
    files, crossings between test and training), read from the previous images.npy.
    """
    channels = pixels.images.shape[-1]

    def read(source: image_file.OldRows, count: int, rows: np.ndarray) -> image_file.PixelSums:
        return image_file.pixel_sums(image_file.iter_blocks(source, count, rows), source.shape[-1])

    if pixels.decoded_sums is None:
        return read(pixels.images, pixels.count, np.flatnonzero(counted))
    copied = counted & (pixels.old_rows >= 0)
    carried = _carried_sums(previous, pixels.old_rows[copied], pixels.copied_channels)
    if carried is None:
        return pixels.decoded_sums + read(pixels.images, pixels.count, np.flatnonzero(copied))
    return pixels.decoded_sums + (carried if channels == len(carried.total) else carried.first_channel())


def _carried_sums(previous: _Previous | None, old_rows: np.ndarray, channels: int) -> image_file.PixelSums | None:
    """The sums over the previous version's ``old_rows`` (with repeats), from its own sums; None if it has none."""
    recorded = previous.lineage.get("pixel_sums") if previous is not None else None
    if previous is None or not recorded or recorded.get("scope") != "non-test" \
            or previous.images.shape[-1] != channels or len(recorded.get("sum", ())) != channels:
        return None
    sums = image_file.PixelSums(int(recorded["count"]), tuple(recorded["sum"]), tuple(recorded["sum_sq"]))
    n_old = len(previous.counted)
    # Each old row should count as often as it is copied now, instead of once if it was counted before.
    change = np.bincount(old_rows, minlength=n_old) - previous.counted.astype(np.int64)
    for weight in np.unique(change[change != 0]).tolist():
        rows = np.flatnonzero(change == weight)
        sums = sums + image_file.pixel_sums(image_file.iter_blocks(previous.images, n_old, rows), channels).times(weight)
    return sums


# --------------------------------------------------------------------------- lineage

def _lineage(source: SourceIndex, previous: _Previous | None, seed: int, test_fraction: float,
             decode: dict[str, Any] | None, source_ids: list[str], keys: list[str]) -> dict[str, Any]:
    """This data version's lineage; the data version only moves when the source's data changed."""
    before = previous.lineage if previous is not None else {}
    same_data = bool(before) and (before.get("source"), before.get("source_version")) == (source.source,
                                                                                           source.source_version)
    versions: list[dict[str, Any]] = list(before.get("versions", []))
    if not same_data:
        old = previous.by_source_id if previous is not None else {}
        current = dict(zip(source_ids, keys, strict=True))
        versions.append({
            "data_version": int(before.get("data_version", 0)) + 1,
            "source_version": source.source_version,
            "added": sum(1 for s in current if s not in old),
            "changed": sorted(s for s, k in current.items() if s in old and old[s] != k),
            "removed": sorted(s for s in old if s not in current),
        })
    return {"data_version": versions[-1]["data_version"], "source": source.source,
            "source_version": source.source_version, "seed": seed, "test_fraction": test_fraction,
            "decode": decode, "versions": versions}


# --------------------------------------------------------------------------- ingest

def ingest(source: str, path: str | os.PathLike[str] | None, seed: int,
           labels_per_class: int | None, label_fraction: float | None, val_per_class: int,
           test_fraction: float, out_dir: str | os.PathLike[str], *,
           image_size: int | tuple[int, int] | None = None, workers: int | None = None,
           cache_file: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Open ``source``, assign splits and write the prepared dataset to ``out_dir``, building on what is there.

    ``workers``: processes that hash and decode the files (None: one per core); the output does not depend on
    it. ``cache_file`` keeps a folder's file hashes between runs. Returns the meta dict plus ``split_counts``,
    ``skipped`` ([(path, reason), ...], the same list as report.json), ``data_version``, the latest lineage entry
    (``added``, ``changed``, ``removed``), ``reused``/``decoded`` image counts and ``left_test``/``entered_test``
    (images that crossed between test and training since the previous version: only a new seed, test_fraction
    or test folder does that).
    """
    out = Path(out_dir)
    workers = workers or default_workers()
    raw = load_source(source, path, image_size=image_size, cache_file=cache_file, workers=workers)
    previous = _read_previous(out)
    keys = raw.identities
    split_args = (seed, labels_per_class, label_fraction, val_per_class, test_fraction)
    # An impossible budget fails here, before any decoding. Test membership is already final (it depends on each
    # image alone), so the normalisation statistics can be summed while the images are written.
    planned = assign_splits(raw.labels, raw.predefined_test, *split_args, keys=raw.keys,
                            previous=_previous_roles(keys, raw.labels, previous, seed), class_names=raw.class_names)
    planned_counted = _counted(planned)

    with atomic_dir(out) as tmp:
        # mkdtemp makes the directory 0700; give it normal permissions so others can read it.
        os.chmod(tmp, 0o755)
        pixels = _write_pixels(tmp / IMAGES_FILE, raw, previous, workers, planned_counted)
        kept = pixels.kept
        keys = [k for k, ok in zip(keys, kept, strict=True) if ok]
        source_ids = [s for s, ok in zip(raw.source_ids, kept, strict=True) if ok]
        labels, predefined_test = raw.labels[kept], raw.predefined_test[kept]
        if not source_ids:
            raise DataError(f"no readable images found under {path}; see the skipped files")
        splits = assign_splits(labels, predefined_test, *split_args,
                               keys=None if raw.keys is None else keys,
                               previous=_previous_roles(keys, labels, previous, seed), class_names=raw.class_names)
        non_test = splits != "test"
        counted = _counted(splits)
        if pixels.decoded_sums is not None and not np.array_equal(counted, planned_counted[kept]):
            pixels = dataclasses.replace(pixels, decoded_sums=None)  # not what was summed: read them all
        sums = _non_test_sums(pixels, counted, previous)
        lineage = _lineage(raw, previous, seed, test_fraction, pixels.decode, source_ids, keys)
        lineage["pixel_sums"] = {"scope": "non-test" if non_test.any() else "all", "count": sums.count,
                                 "sum": list(sums.total), "sum_sq": list(sums.total_sq)}
        data_version = lineage["data_version"]
        before_versions = previous.version if previous is not None else {}
        manifest = pd.DataFrame({
            "index": np.arange(len(keys), dtype=np.int64),
            "split": splits,
            "label": labels.astype(np.int64),
            "source_id": source_ids,
            "sha1": pixels.sha1,
            "key": keys,
            "version": np.array([before_versions.get(k, data_version) for k in keys], dtype=np.int64),
        }, columns=MANIFEST_COLUMNS)

        shape = [pixels.count, *pixels.images.shape]
        mean, std = mean_std(sums)
        skipped = sorted([*raw.skipped, *pixels.failed])
        meta: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "class_names": list(raw.class_names),
            "num_classes": len(raw.class_names),
            "shape": [int(d) for d in shape[1:]],
            "mean": mean,
            "std": std,
            "source": raw.source,
            "source_version": raw.source_version,
            "num_images": int(pixels.count),
            "num_test": int((~non_test).sum()),
            "num_skipped": len(skipped),
        }
        report = {"skipped": [{"path": p, "reason": r} for p, r in skipped], "num_skipped": len(skipped)}
        np.save(tmp / POOL_FILE, np.flatnonzero(non_test).astype(np.int64), allow_pickle=False)
        manifest.to_csv(tmp / MANIFEST_FILE, index=False, lineterminator="\n")
        (tmp / META_FILE).write_text(_dumps(meta))
        (tmp / REPORT_FILE).write_text(_dumps(report))
        (tmp / LINEAGE_FILE).write_text(_dumps(lineage))

    crossed = _crossings(previous, keys, splits)
    latest = lineage["versions"][-1]
    return {**meta, "split_counts": split_counts(splits), "skipped": skipped, "data_version": data_version,
            "added": latest["added"], "changed": latest["changed"], "removed": latest["removed"],
            "reused": pixels.reused, "decoded": pixels.decoded, **crossed}


def _counted(splits: np.ndarray) -> np.ndarray:
    """The images the normalisation statistics cover: never test pixels; a test-only source falls back to all."""
    non_test = splits != "test"
    return non_test if non_test.any() else np.ones(len(splits), dtype=bool)


def _crossings(previous: _Previous | None, keys: list[str], splits: np.ndarray) -> dict[str, int]:
    """How many images still here moved between test and training since the previous version."""
    left = entered = 0
    if previous is not None:
        for key, split in zip(keys, splits.tolist(), strict=True):
            before = previous.split.get(key)
            if before is not None and (before[0] == "test") != (split == "test"):
                left += before[0] == "test"
                entered += split == "test"
    return {"left_test": left, "entered_test": entered}
