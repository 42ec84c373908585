"""Writing the prepared dataset: a raw source and its splits become the directory every later stage reads.

The format (file names, what each holds) is ``ssl_lib.data.layout``'s; only the ingest stage writes it.

Ingest is incremental and streams. The prepared dataset already in ``out_dir`` is the previous data version:
its images whose file content (sha256) is unchanged keep their rows instead of being decoded again, its val and
labeled images keep their roles (``splits.assign_splits``), and every image keeps the data version at which it
entered. New or changed files are decoded once each, in parallel, straight into images.npy (``image_file``);
memory stays flat in the number of images.

Rows stay where they are: the previous version's rows still in the source come first, in their order, and new
images follow (``_row_order``). When nothing was removed, the new rows are appended to the previous images.npy
itself, which then becomes the new version's too (``_grows_in_place``): no unchanged pixel is copied. Otherwise
the kept rows are copied into a new file by the kernel.

The directory is replaced atomically (``io.atomic_dir``). An exception leaves the previous version as it was:
rows appended to its images.npy are cut off again (``_restored_on_failure``). If the process is killed, the
previous version stays readable as it was: appended rows lie past the rows its header counts, which every
reader ignores and the next ingest cuts off. Only a kill within the commit itself (``_commit``: one header write,
then the directory swap) can leave the previous manifest with an images.npy counting more rows; readers then
refuse it and the next ingest builds on its first rows. What a kill leaves beside the directory (the temporary
one, or the previous version moved aside within the swap) the next ingest puts right first (``io.recover_dir``),
and the files of the directory that ingest does not write (DVC's tracked .gitignore) pass into each new version
before the swap, so git sees no change once an ingest has run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..io import atomic_dir, recover_dir
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
from .sources import FolderSource, RawDataset, SourceIndex, check_classes, load_source
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

@dataclass(frozen=True, eq=False)  # eq=False: arrays have no plain ==
class _Previous:
    """The prepared dataset being replaced: one entry per row of its images.npy, and where each key is."""

    lineage: dict[str, Any]
    keys: np.ndarray                     # per row (object strings)
    split: np.ndarray                    # per row
    label: np.ndarray                    # per row, int64
    sha1: list[str]                      # per row: sha1 of its pixels
    version: np.ndarray                  # per row: data version at which it entered, int64
    source_ids: np.ndarray               # per row
    images: image_file.OldRows
    manifest: Path                       # its manifest.csv, whose rows the fields above are
    row_of: dict[str, int]               # each key's last row: a dict looks up 100,000s of strings 4x faster than a
                                         # pandas Index, which hashes them again

    @property
    def count(self) -> int:
        return len(self.keys)

    @property
    def counted(self) -> np.ndarray:
        """Per row: in its pixel sums (a non-test image)."""
        return self.split != "test"

    @property
    def unique(self) -> bool:
        """Whether no two rows have the same key."""
        return len(self.row_of) == self.count

    def find(self, keys: list[str] | np.ndarray) -> np.ndarray:
        """The row of each key (its last one), -1 if it had none."""
        get = self.row_of.get
        return np.fromiter((get(key, -1) for key in keys), dtype=np.int64, count=len(keys))


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
    # More rows than the manifest's: an ingest was killed while committing rows appended after them (_commit).
    if list(m.columns) != MANIFEST_COLUMNS or len(m) > count or not isinstance(lineage, dict):
        return None
    keys = m["key"].to_numpy(dtype=object)
    return _Previous(
        lineage=lineage,
        keys=keys,
        split=m["split"].to_numpy(dtype=object),
        label=m["label"].to_numpy(dtype=np.int64),
        sha1=m["sha1"].tolist(),
        version=m["version"].to_numpy(dtype=np.int64),
        source_ids=m["source_id"].to_numpy(dtype=object),
        images=images,
        manifest=out_dir / MANIFEST_FILE,
        row_of={key: row for row, key in enumerate(keys.tolist())},  # a later row of a key replaces an earlier one
    )


def _previous_roles(rows: np.ndarray, labels: np.ndarray, previous: _Previous | None, seed: int) -> np.ndarray | None:
    """Each image's split in the previous version ("" if new), for assign_splits; None when there is nothing to keep.

    ``rows``: each image's row in the previous version (``_Previous.find``), -1 if it had none. Roles drawn with
    another seed are not kept (a new seed asks for a new draw), nor the role of an image whose label changed (it
    counts as an old unlabeled image of its new class).
    """
    if previous is None or previous.lineage.get("seed") != seed:
        return None
    known = rows >= 0
    roles = np.full(len(rows), "", dtype="<U9")
    same_label = previous.label[rows[known]] == labels[known]
    roles[known] = np.where(same_label, previous.split[rows[known]], "unlabeled")
    return roles


# --------------------------------------------------------------------------- where each image's row goes

def _decode(source: SourceIndex) -> dict[str, Any] | None:
    """How a folder's files are decoded (lineage.json's ``decode``); None for an in-memory source."""
    if not isinstance(source, FolderSource):
        return None
    width, height = source.size_wh
    return {"mode": source.decode_mode, "size": [width, height]}


def _row_order(source: SourceIndex, previous: _Previous | None, found: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The order the source's images are written in, and the row of the previous images.npy each one (in that
    order) copies: -1 for an image to decode.

    Only a folder's rows are reused, and only when its files are decoded as they were. Each previous row whose
    image is still in the source (the same key; files with the same content take one row each) keeps its place:
    those images come first, in their rows' order, and the rest follow in source order. So a folder that only
    grew only appends rows (``_grows_in_place``), and what is written never depends on whether the previous rows
    were kept in place or copied. An image without a row of its own still copies a previous row with its
    content (a copied file) rather than being decoded. ``found``: each image's row in the previous version
    (``_Previous.find``).
    """
    n = len(source.source_ids)
    if previous is None or _decode(source) is None or previous.lineage.get("decode") != _decode(source):
        return np.arange(n), np.full(n, -1, dtype=np.int64)
    own = found
    if not previous.unique or np.bincount(own[own >= 0], minlength=previous.count).max(initial=0) > 1:
        # A key held by several images (copies of one file): the n-th image with it takes its n-th previous row.
        new = pd.DataFrame({"key": source.identities})
        new["nth"] = new.groupby("key").cumcount()
        old = pd.DataFrame({"key": previous.keys, "row": np.arange(previous.count)})
        old["nth"] = old.groupby("key").cumcount()
        own = new.merge(old, on=["key", "nth"], how="left")["row"].fillna(-1).to_numpy(dtype=np.int64)
    kept = np.flatnonzero(own >= 0)
    order = np.concatenate([kept[np.argsort(own[kept], kind="stable")], np.flatnonzero(own < 0)])
    rows = own[order]
    spare = rows < 0
    rows[spare] = found[order[spare]]
    return order, rows


def _in_order(source: SourceIndex, order: np.ndarray) -> SourceIndex:
    """``source`` with its images in ``order``."""
    if np.array_equal(order, np.arange(len(order))):
        return source
    picked: dict[str, Any] = {
        "labels": source.labels[order], "predefined_test": source.predefined_test[order],
        "source_ids": [source.source_ids[i] for i in order.tolist()],
        "keys": None if source.keys is None else [source.keys[i] for i in order.tolist()]}
    if isinstance(source, FolderSource):
        picked["records"] = [source.records[i] for i in order.tolist()]
    return dataclasses.replace(source, **picked)


def _grows_in_place(previous: _Previous | None, old_rows: np.ndarray, row_shape: tuple[int, ...]) -> bool:
    """Whether this version's images.npy is the previous one with rows appended, written into that same file.

    That needs every previous row kept where it is (``_row_order``: nothing removed or changed), rows of the same
    shape (same channels: a grey file narrowed to one is rewritten), a header that can count the new rows
    without growing, and a file no other name shares: with some cache types DVC links an output's workspace
    file to its cache (a hardlink, a symlink, read-only when protected), and appending to it would change the
    cached copy of the previous version too. Otherwise the kept rows are copied into a new file.
    """
    if previous is None or previous.images.shape != row_shape \
            or not np.array_equal(old_rows[:previous.count], np.arange(previous.count)) \
            or not image_file.can_resize(previous.images, len(old_rows)):
        return False
    try:
        st = os.lstat(previous.images.path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and bool(st.st_mode & stat.S_IWUSR) \
        and os.access(previous.images.path, os.W_OK)


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


def _write_pixels(target: Path, source: SourceIndex, previous: _Previous | None, old_rows: np.ndarray,
                  in_place: bool, workers: int, count: np.ndarray) -> _Pixels:
    """Write the source's images (in their row order, ``_row_order``) as rows of ``target``, or, ``in_place``,
    after the previous version's rows in its own images.npy (``_grows_in_place``). Their header is set by
    ``_commit``."""
    if isinstance(source, RawDataset):
        images = image_file.create(target, source.images.shape)
        sha1 = image_file.write_array(images, source.images)
        n = len(sha1)
        return _Pixels(images, n, np.ones(n, bool), sha1, [], None, 0, n, np.full(n, -1), None, images.shape[-1])
    if not isinstance(source, FolderSource):
        raise TypeError(f"cannot write pixels of a {type(source).__name__}")

    width, height = source.size_wh
    channels = 3 if source.decode_mode == "RGB" else 1
    n = len(old_rows)
    # Rows already in place (in_place: the previous version's), then the rows written here.
    start = previous.count if in_place and previous is not None else 0
    if in_place and previous is not None:
        images = previous.images
        region = image_file.extend(images, start, n - start)
    else:
        images = region = image_file.create(target, (n, height, width, channels))
    # A previous row's pixel sha1 carries over when it is copied unchanged (same channels).
    carry_sha1 = previous is not None and previous.images.shape[-1] == channels
    items: list[str | image_file.Reuse] = [
        image_file.Reuse(row, previous.sha1[row] if carry_sha1 else "") if row >= 0 and previous is not None
        else os.path.join(source.root, record.rel)
        for row, record in zip(old_rows[start:].tolist(), source.records[start:], strict=True)]
    result = image_file.fill(region, items, mode=source.decode_mode, size_wh=source.size_wh,
                             count=count[start:].tolist(), old=previous.images if previous is not None else None,
                             workers=workers)
    kept = np.ones(n, dtype=bool)
    kept[[start + row for row in result.failed]] = False
    failed = [(source.source_ids[start + row], why) for row, why in sorted(result.failed.items())]
    written = start + image_file.compact_rows(region, n - start, kept[start:])
    sha1 = (previous.sha1[:start] if previous is not None else []) \
        + [s for s, k in zip(result.sha1, kept[start:], strict=True) if k]
    sums = result.decoded_sums
    # Rows kept in place hold colour: a previous version with no colour row has one channel, never grows in place.
    if channels == 3 and not result.colour and not in_place:
        # Every image turned out grey: store one channel, as a folder of grey files would be.
        narrowed = target.with_name(f".{target.name}.grey")
        grey, sha1 = image_file.narrow_channels(images, written, narrowed)
        os.replace(narrowed, target)
        images = image_file.OldRows(str(target), grey.offset, grey.shape)
        sums = sums.first_channel()  # grey rows: three equal channels
    reused = int((old_rows >= 0).sum())
    return _Pixels(images, written, kept, sha1, failed, _decode(source), reused, n - reused, old_rows[kept], sums,
                   channels)


def _commit(pixels: _Pixels, target: Path) -> None:
    """Make ``target`` the written images.npy, its header counting its rows.

    Rows appended to the previous version's images.npy join it there under a second name (a hardlink: nothing
    is copied; a copy where the file system has none), and only then does its header count them. Until that
    header write, a reader of the previous version sees exactly its rows.
    """
    images = pixels.images
    if images.path != str(target):
        try:
            os.link(images.path, target)
        except OSError:
            shutil.copyfile(images.path, target)
    image_file.resize(image_file.OldRows(str(target), images.offset, images.shape), pixels.count)


@contextmanager
def _restored_on_failure(previous: _Previous | None, in_place: bool) -> Iterator[None]:
    """If the block fails, cut the previous images.npy back to its own rows and header, when rows were being
    appended to it (``in_place``): the previous version is then as it was."""
    try:
        yield
    except BaseException:
        if in_place and previous is not None:
            image_file.resize(previous.images, previous.count)
        raise


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
        blocks = image_file.iter_blocks(previous.images, n_old, rows)
        sums = sums + image_file.pixel_sums(blocks, channels).times(weight)
    return sums


# --------------------------------------------------------------------------- lineage

def _origin(source: SourceIndex) -> dict[str, str]:
    """Where the data come from: the source, and a folder's path as data.path gives it (lineage.json's ``source``,
    ``root``; not resolved: a relative path names the same folder in DVC's temp workspaces)."""
    if isinstance(source, FolderSource):
        return {"source": source.source, "root": os.path.normpath(source.root)}
    return {"source": source.source}


def _continues(lineage: dict[str, Any], source: SourceIndex) -> bool:
    """Whether ``source`` continues the lineage of the previous version: the same source (a folder: the same
    folder; a lineage written before roots were recorded counts as the same). Another source starts a lineage."""
    origin = _origin(source)
    return bool(lineage) and lineage.get("source") == origin["source"] \
        and lineage.get("root", origin.get("root")) == origin.get("root")


def _lineage(source: SourceIndex, previous: _Previous | None, seed: int, test_fraction: float,
             decode: dict[str, Any] | None, source_ids: list[str], keys: list[str]) -> dict[str, Any]:
    """This data version's lineage; the data version only moves when the source's data changed.

    A new source (another built-in source, another folder) starts a new lineage at data version 1, its images
    all added; ``follows`` names the lineage it replaced in the directory. Its files are not "removed" from it.
    """
    before = previous.lineage if previous is not None else {}
    continued = _continues(before, source)
    same_data = continued and before.get("source_version") == source.source_version
    versions: list[dict[str, Any]] = list(before.get("versions", [])) if continued else []
    if not same_data:
        old = dict(zip(previous.source_ids.tolist(), previous.keys.tolist(), strict=True)) \
            if previous is not None and continued else {}
        added, changed = 0, []
        for source_id, key in zip(source_ids, keys, strict=True):
            was = old.get(source_id)
            if was is None:
                added += 1
            elif was != key:
                changed.append(source_id)
        versions.append({
            "data_version": int(before.get("data_version", 0)) + 1 if continued else 1,
            "source_version": source.source_version,
            "added": added,
            "changed": sorted(changed),
            "removed": sorted(old.keys() - set(source_ids)),
        })
    lineage = {"data_version": versions[-1]["data_version"], **_origin(source),
               "source_version": source.source_version, "seed": seed, "test_fraction": test_fraction,
               "decode": decode, "versions": versions}
    if before and not continued:
        lineage["follows"] = {key: before[key] for key in ("source", "root", "data_version") if key in before}
    elif "follows" in before:
        lineage["follows"] = before["follows"]
    return lineage


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
    recover_dir(out)  # a killed ingest's leftovers, before the previous version is read
    workers = workers or default_workers()
    loaded = load_source(source, path, image_size=image_size, cache_file=cache_file, workers=workers)
    check_classes(loaded)
    previous = _read_previous(out)
    # Each image's row in the previous version (-1 if new): one lookup, used for its row, role, version and crossings.
    found = previous.find(loaded.identities) if previous is not None else np.full(len(loaded.source_ids), -1)
    order, old_rows = _row_order(loaded, previous, found)
    raw = _in_order(loaded, order)
    row_shape = (*loaded.size_wh[::-1], 3 if loaded.decode_mode == "RGB" else 1) \
        if isinstance(loaded, FolderSource) else ()
    in_place = _grows_in_place(previous, old_rows, row_shape)
    keys = raw.identities
    before = found[order]
    split_args = (seed, labels_per_class, label_fraction, val_per_class, test_fraction)
    # An impossible budget fails here, before any decoding. Test membership is already final (it depends on each
    # image alone), so the normalisation statistics can be summed while the images are written.
    planned = assign_splits(raw.labels, raw.predefined_test, *split_args, keys=raw.keys,
                            previous=_previous_roles(before, raw.labels, previous, seed), class_names=raw.class_names)
    planned_counted = _counted(planned)

    with _restored_on_failure(previous, in_place), atomic_dir(out, keep=(".gitignore",)) as tmp:
        # mkdtemp makes the directory 0700; give it normal permissions so others can read it.
        os.chmod(tmp, 0o755)
        pixels = _write_pixels(tmp / IMAGES_FILE, raw, previous, old_rows, in_place, workers, planned_counted)
        kept = pixels.kept
        if kept.all():
            splits, source_ids, labels = planned, raw.source_ids, raw.labels
        else:  # files that failed to decode are left out: the budget is drawn again without them
            keys = [k for k, ok in zip(keys, kept, strict=True) if ok]
            before = before[kept]
            source_ids = [s for s, ok in zip(raw.source_ids, kept, strict=True) if ok]
            labels = raw.labels[kept]
            if not source_ids:
                raise DataError(f"no readable images found under {path}; see the skipped files")
            check_classes(raw, labels, [*raw.skipped, *pixels.failed])  # a class whose every file failed to decode
            splits = assign_splits(labels, raw.predefined_test[kept], *split_args,
                                   keys=None if raw.keys is None else keys,
                                   previous=_previous_roles(before, labels, previous, seed),
                                   class_names=raw.class_names)
        non_test = splits != "test"
        counted = _counted(splits)
        if pixels.decoded_sums is not None and not np.array_equal(counted, planned_counted[kept]):
            pixels = dataclasses.replace(pixels, decoded_sums=None)  # not what was summed: read them all
        sums = _non_test_sums(pixels, counted, previous)
        lineage = _lineage(raw, previous, seed, test_fraction, pixels.decode, source_ids, keys)
        lineage["pixel_sums"] = {"scope": "non-test" if non_test.any() else "all", "count": sums.count,
                                 "sum": list(sums.total), "sum_sq": list(sums.total_sq)}
        data_version = lineage["data_version"]
        _write_manifest(tmp / MANIFEST_FILE, {
            "index": np.arange(len(keys), dtype=np.int64),
            "split": splits,
            "label": labels.astype(np.int64),
            "source_id": np.asarray(source_ids, dtype=object),
            "sha1": np.asarray(pixels.sha1, dtype=object),
            "key": np.asarray(keys, dtype=object),
            # A new lineage's images all enter at its first version, whatever rows they share with the old one.
            "version": _entered(previous if previous is not None and _continues(previous.lineage, raw) else None,
                                before, data_version),
        }, previous)

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
        (tmp / META_FILE).write_text(_dumps(meta))
        (tmp / REPORT_FILE).write_text(_dumps(report))
        (tmp / LINEAGE_FILE).write_text(_dumps(lineage))
        _commit(pixels, tmp / IMAGES_FILE)  # last: until then the previous version is whole

    crossed = _crossings(previous, before, splits)
    latest = lineage["versions"][-1]
    return {**meta, "split_counts": split_counts(splits), "skipped": skipped, "data_version": data_version,
            "added": latest["added"], "changed": latest["changed"], "removed": latest["removed"],
            "reused": pixels.reused, "decoded": pixels.decoded, **crossed}


def _write_manifest(path: Path, columns: dict[str, np.ndarray], previous: _Previous | None) -> None:
    """Write manifest.csv from its ``columns``.

    When its first rows are the previous version's, unchanged (a folder that only grew), the previous file is
    copied and only the rows after them are formatted: the same bytes as writing them all, since this code wrote
    that file, without formatting 100,000s of unchanged rows again.
    """
    n = 0
    if previous is not None and 0 < previous.count <= len(columns["key"]):
        head = {name: column[:previous.count] for name, column in columns.items()}
        if np.array_equal(head["key"], previous.keys) and np.array_equal(head["split"], previous.split) \
                and np.array_equal(head["label"], previous.label) \
                and np.array_equal(head["source_id"], previous.source_ids) \
                and np.array_equal(head["version"], previous.version) and head["sha1"].tolist() == previous.sha1:
            shutil.copyfile(previous.manifest, path)
            n = previous.count
    rows = pd.DataFrame({name: column[n:] for name, column in columns.items()}, columns=MANIFEST_COLUMNS)
    rows.to_csv(path, mode="a" if n else "w", header=not n, index=False, lineterminator="\n")


def _counted(splits: np.ndarray) -> np.ndarray:
    """The images the normalisation statistics cover: never test pixels; a test-only source falls back to all."""
    non_test = splits != "test"
    return non_test if non_test.any() else np.ones(len(splits), dtype=bool)


def _entered(previous: _Previous | None, rows: np.ndarray, data_version: int) -> np.ndarray:
    """The data version at which each image (``rows``: its previous row, or -1 if new) entered."""
    versions = np.full(len(rows), data_version, dtype=np.int64)
    if previous is not None:
        versions[rows >= 0] = previous.version[rows[rows >= 0]]
    return versions


def _crossings(previous: _Previous | None, rows: np.ndarray, splits: np.ndarray) -> dict[str, int]:
    """How many images still here (``rows``: each one's previous row, or -1) moved between test and training."""
    if previous is None:
        return {"left_test": 0, "entered_test": 0}
    known = rows >= 0
    was_test, is_test = previous.split[rows[known]] == "test", splits[known] == "test"
    return {"left_test": int((was_test & ~is_test).sum()), "entered_test": int((~was_test & is_test).sum())}
