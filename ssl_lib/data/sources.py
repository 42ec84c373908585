"""Open a raw image source: Fashion-MNIST, sklearn digits, or a folder of images.

The fixed releases (Fashion-MNIST, digits) are small and load into memory (``RawDataset``). A folder is only
listed, hashed and its headers read (``FolderSource``): ingest decodes its files once, in parallel, straight into
the prepared images.npy. Both describe their images the same way (``SourceIndex``), so splits never need to
know where the pixels come from. ``source_fingerprint`` identifies a source's data without decoding it.
"""
from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..sizing import fit_image_size
from .decode import GREY_MODES
from .errors import DataError
from .files import IMAGE_EXTENSIONS, FileRecord, folder_version, scan_files
from .idx import read_idx

SOURCES: tuple[str, ...] = ("fashion-mnist", "digits", "folder")

FASHION_MNIST_CLASSES: list[str] = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
CACHE_DIR = Path("~/.cache/ssl-pipeline")

# Reserved folder names inside a `folder` source; everything else at the top level is a class.
TEST_DIR = "test"
UNLABELED_DIR = "unlabeled"

_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True, eq=False, kw_only=True)  # eq=False: comparing numpy arrays with == is ambiguous
class SourceIndex:
    """Every image of a source, in a deterministic order, before any split is chosen."""

    labels: np.ndarray            # int64 (N,), -1 = unlabeled
    source_ids: list[str]         # id per image, e.g. "train/00123" or "cat/001.png"
    predefined_test: np.ndarray   # bool (N,), True where the source itself says "test"
    class_names: list[str]
    source: str
    source_version: str           # the source's data version (its fingerprint)
    # Identity per image for splits and reuse: a content hash; None for a fixed release, whose images are
    # identified by their position (their source_id).
    keys: list[str] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def __post_init__(self) -> None:
        # The loaders check the user's files (with DataError) before building this: what fails here is a
        # loader's bug, so it stays a plain ValueError with its traceback.
        n = len(self.source_ids)
        if self.labels.shape != (n,) or self.predefined_test.shape != (n,) \
                or (self.keys is not None and len(self.keys) != n):
            raise ValueError(f"{self.source}: labels, predefined_test, source_ids and keys "
                             "must all have one entry per image")
        if n and (self.labels.min() < -1 or self.labels.max() >= len(self.class_names)):
            raise ValueError(f"{self.source}: labels must be -1 (unlabeled) or a class index "
                             f"below {len(self.class_names)}")

    @property
    def identities(self) -> list[str]:
        """The key of each image: its content key, or its source id for a fixed release."""
        return list(self.keys) if self.keys is not None else list(self.source_ids)


@dataclass(frozen=True, eq=False, kw_only=True)
class RawDataset(SourceIndex):
    """A source held in memory with its pixels."""

    images: np.ndarray            # uint8 (N, H, W, C)

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"{self.source}: images must be uint8 (N, H, W, C), "
                             f"got {self.images.dtype} {self.images.shape}")
        if len(self.images) != len(self.source_ids):
            raise ValueError(f"{self.source}: images, labels, predefined_test and source_ids "
                             "must all have one entry per image")
        super().__post_init__()


@dataclass(frozen=True, eq=False, kw_only=True)
class FolderSource(SourceIndex):
    """A folder's usable image files (not decoded) and how ingest decodes them."""

    root: Path
    records: list[FileRecord]     # one per image, aligned with source_ids
    size_wh: tuple[int, int]      # every image is resized to this (width, height)
    decode_mode: str              # "L" when no file can hold colour, else "RGB" (grey results are narrowed later)


def load_source(name: str, path: str | os.PathLike[str] | None = None, *,
                image_size: int | tuple[int, int] | None = None,
                cache_file: str | os.PathLike[str] | None = None,
                workers: int | None = None) -> RawDataset | FolderSource:
    """Open source ``name`` ("fashion-mnist", "digits" or "folder") at ``path``.

    ``image_size`` ((height, width) or one int for square) only applies to "folder"; the other sources have a
    fixed native size. ``cache_file`` keeps a folder's file hashes between calls and ``workers`` processes read
    the files not in it (``files.scan_files``).
    """
    key = str(name).strip().lower().replace("_", "-")
    if key not in SOURCES:
        raise DataError(f"unknown data source {name!r}; set data.source to one of: {', '.join(SOURCES)}")
    if key == "folder":
        return load_folder(path, image_size=image_size, cache_file=cache_file, workers=workers)
    if image_size is not None:
        raise DataError(f"data.image_size only applies to the 'folder' source; "
                        f"remove it (set it to null) for {key!r}")
    if key == "digits":
        if path is not None:
            raise DataError("the 'digits' source is built into scikit-learn and takes no path; "
                            "set data.path to null")
        return load_digits()
    return load_fashion_mnist(path)


def source_fingerprint(name: str, path: str | os.PathLike[str] | None = None, *,
                       cache_file: str | os.PathLike[str] | None = None) -> dict[str, object]:
    """What identifies the source's data: its name, data version, classes and file count. Decodes no image.

    A folder's version digests every file's path and content hash (hashes cached by file metadata); a fixed
    release's digests its decoded arrays (digits: the scikit-learn release). The classes are there too, since a
    folder's (empty) class directories name classes without adding a file. The same data always give the same
    fingerprint, so the ingest stage (which depends on it) reruns exactly when the data changed.
    """
    source = load_source(name, path, cache_file=cache_file)
    count = len(source.records) + len(source.skipped) if isinstance(source, FolderSource) else len(source.labels)
    return {"source": source.source, "source_version": source.source_version, "class_names": source.class_names,
            "num_files": count}


# --------------------------------------------------------------------------- fashion-mnist

def _find_fashion_files(directory: Path) -> dict[str, Path] | None:
    """Map each of the four IDX files to its path in ``directory`` (.gz preferred), or None."""
    found: dict[str, Path] = {}
    for key, stem in _FASHION_FILES.items():
        for candidate in (directory / f"{stem}.gz", directory / stem):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def _download_fashion_mnist(cache: Path) -> tuple[Path | None, str]:
    """Fetch Fashion-MNIST with torchvision into ``cache``; returns (raw dir or None, why not)."""
    try:
        from torchvision.datasets import FashionMNIST  # optional and slow to import
    except ImportError as exc:
        return None, f"torchvision is not installed ({exc})"
    try:
        for train in (True, False):
            FashionMNIST(root=str(cache), train=train, download=True)
    except Exception as exc:  # network errors come in many types (URLError, RuntimeError, ...)
        return None, f"download failed ({type(exc).__name__}: {exc})"
    return cache / "FashionMNIST" / "raw", ""


def load_fashion_mnist(path: str | os.PathLike[str] | None = None) -> RawDataset:
    """Fashion-MNIST from ``path``, else the Debian package, else a torchvision download.

    Train images come first ("train/NNNNN"), then the predefined test set ("test/NNNNN").
    """
    install_hint = ("install it with `apt-get install dataset-fashion-mnist`, or point data.path "
                    "at a directory holding train-images-idx3-ubyte(.gz), train-labels-idx1-ubyte(.gz), "
                    "t10k-images-idx3-ubyte(.gz) and t10k-labels-idx1-ubyte(.gz)")
    if path is not None:
        files = _find_fashion_files(Path(path))
        if files is None:
            raise DataError(f"Fashion-MNIST IDX files not found in {path}; {install_hint}")
    else:
        cache = CACHE_DIR.expanduser()
        files = (_find_fashion_files(DEBIAN_FASHION_MNIST_DIR)
                 or _find_fashion_files(cache / "FashionMNIST" / "raw"))
        if files is None:
            raw_dir, why = _download_fashion_mnist(cache)
            files = _find_fashion_files(raw_dir) if raw_dir is not None else None
            if files is None:
                raise DataError(f"Fashion-MNIST not found in {DEBIAN_FASHION_MNIST_DIR} or {cache} "
                                f"and {why or 'the download left no IDX files'}; {install_hint}")

    def read(key: str, ndim: int) -> np.ndarray:
        try:
            return read_idx(files[key], expected_ndim=ndim)
        except DataError as exc:
            raise DataError(f"{exc} (for the Debian copy: apt-get install --reinstall "
                            "dataset-fashion-mnist)") from exc

    train_x, train_y = read("train_images", 3), read("train_labels", 1)
    test_x, test_y = read("test_images", 3), read("test_labels", 1)
    for x, y, xk, yk in ((train_x, train_y, "train_images", "train_labels"),
                         (test_x, test_y, "test_images", "test_labels")):
        if len(x) != len(y):
            raise DataError(f"{files[xk]} has {len(x)} images but {files[yk]} has {len(y)} labels; "
                            "the files come from different releases, replace them with a matching set")
        if x.dtype != np.uint8 or y.dtype != np.uint8 or (len(y) and y.max() >= len(FASHION_MNIST_CLASSES)):
            raise DataError(f"{files[xk]} / {files[yk]} do not look like Fashion-MNIST "
                            "(expected uint8 images and labels 0..9); replace them")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataError(f"train images are {train_x.shape[1:]} but test images are {test_x.shape[1:]}; "
                        "replace the files with a matching set")

    # Hash the decoded contents, not the file bytes, so a recompressed or gunzipped copy of the
    # same data keeps the same version and downstream caches stay valid.
    digest = hashlib.sha256()
    for array in (train_x, train_y, test_x, test_y):
        digest.update(repr(array.shape).encode())
        digest.update(array.tobytes())

    return RawDataset(
        images=np.concatenate([train_x, test_x])[..., None],
        labels=np.concatenate([train_y, test_y]).astype(np.int64),
        source_ids=[f"train/{i:05d}" for i in range(len(train_x))]
        + [f"test/{i:05d}" for i in range(len(test_x))],
        predefined_test=np.concatenate([np.zeros(len(train_x), bool), np.ones(len(test_x), bool)]),
        class_names=list(FASHION_MNIST_CLASSES),
        source="fashion-mnist",
        source_version=f"sha256:{digest.hexdigest()}",
    )


# --------------------------------------------------------------------------- digits

def load_digits() -> RawDataset:
    """scikit-learn's 8x8 digits (1797 images), rescaled from 0..16 to 0..255. No test set.

    Read from the file ``sklearn.datasets.load_digits`` reads (``digits.csv.gz``: 64 pixels then the label per row),
    found without importing scikit-learn: its import costs about a second, paid by every fingerprint and ingest
    process on digits. ``tests/test_data.py`` checks the arrays against scikit-learn's loader.
    """
    import importlib.metadata
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    csv = (Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
           if spec is not None and spec.submodule_search_locations else None)
    if csv is None or not csv.is_file():
        raise DataError("the 'digits' source is scikit-learn's digits, and scikit-learn is not installed here "
                        "(or has no datasets/data/digits.csv.gz): pip install scikit-learn")
    rows = np.loadtxt(csv, delimiter=",")
    images = np.rint(rows[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[..., None]
    labels = rows[:, -1].astype(np.int64)
    return RawDataset(
        images=images,
        labels=labels,
        source_ids=[f"digits/{i:05d}" for i in range(len(images))],
        predefined_test=np.zeros(len(images), bool),
        class_names=[str(c) for c in range(10)],
        source="digits",
        source_version=f"sklearn-{importlib.metadata.version('scikit-learn')}",
    )


# --------------------------------------------------------------------------- folder

def check_classes(source: SourceIndex, labels: np.ndarray | None = None,
                  skipped: Sequence[tuple[str, str]] | None = None) -> None:
    """Raise DataError unless the source has at least two classes and every class has an image.

    A class without an image would still be a class of the model: it never learns it, class-balanced losses
    divide by its zero count (NaN), and macro F1 averages it in. A source of one class would become a champion no
    real model can be compared with. ``labels`` and ``skipped``: the images left once ingest dropped the files
    that failed to decode, and every file left out (default: the source's own).
    """
    names = source.class_names
    labels = source.labels if labels is None else labels
    if len(names) == 1:
        raise DataError(f"the source has one class ({names[0]!r}): a classifier needs at least two; put each "
                        "class's images in its own sub-folder of data.path")
    counts = np.bincount(labels[labels >= 0], minlength=len(names))
    empty = [names[c] for c in np.flatnonzero(counts == 0).tolist()]
    if empty:
        more = f" (so have {len(empty) - 1} more: {', '.join(map(repr, empty[1:]))})" if len(empty) > 1 else ""
        reason = _empty_class_reason(source, empty[0], source.skipped if skipped is None else skipped)
        raise DataError(f"class {empty[0]!r} has no usable image{more}: {reason}")


def _empty_class_reason(source: SourceIndex, name: str, skipped: Sequence[tuple[str, str]]) -> str:
    """Why a folder's class ``name`` has no image, and the fix."""
    root = source.root if isinstance(source, FolderSource) else None
    if root is None:
        return "the source lists no image of it"
    folders = [root / name, root / TEST_DIR / name]
    if any(folder.is_symlink() for folder in folders):
        # os.walk does not follow links to folders (a link to `.` would loop): the class's folder looks empty.
        return f"data.path/{name} is a symbolic link, which is not followed; replace it with a real folder of images"
    if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
        return f"data.path/{name} is a folder named like an image file; rename it after its class, or remove it"
    lost = [(rel, why) for rel, why in skipped if rel.startswith(f"{name}/") or rel.startswith(f"{TEST_DIR}/{name}/")]
    if lost:
        return (f"all {len(lost)} of its files are unusable ({lost[0][0]}: {lost[0][1]}); replace them, or remove "
                f"data.path/{name}")
    return f"its folder holds no image file; add images to data.path/{name}/ or remove the folder"


def _class_dirs(directory: Path, reserved: set[str]) -> list[str]:
    if not directory.is_dir():
        return []
    return [p.name for p in directory.iterdir()
            if p.is_dir() and not p.name.startswith(".") and p.name not in reserved]


def _role(rel: str, class_index: dict[str, int]) -> tuple[int, bool] | str:
    """(label, is_test) for a file's relative path, or a reason string why it cannot be used."""
    parts = rel.split("/")
    if parts[0] == TEST_DIR:
        if len(parts) < 3 or parts[1] == UNLABELED_DIR:
            return (f"test images need a class: move it into {TEST_DIR}/<class>/ "
                    "(unlabeled images cannot be test images)")
        return class_index[parts[1]], True
    if len(parts) == 1 or parts[0] == UNLABELED_DIR:
        return -1, False
    return class_index[parts[0]], False


def _normalise_size(image_size: int | tuple[int, int] | list[int] | None) -> tuple[int, int] | None:
    """(height, width) from an int or a pair; None means 'use the most common size'."""
    if image_size is None:
        return None
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    try:
        h, w = (int(v) for v in image_size)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        h = w = 0
    if h <= 0 or w <= 0:
        raise DataError(f"data.image_size must be a positive int or [height, width], got {image_size!r}")
    return h, w


def load_folder(path: str | os.PathLike[str] | None, *, image_size: int | tuple[int, int] | None = None,
                cache_file: str | os.PathLike[str] | None = None, workers: int | None = None) -> FolderSource:
    """Images from a directory tree: ``<class>/...`` labeled, root files or ``unlabeled/...``
    unlabeled, ``test/<class>/...`` the predefined test set. Lists them; decodes nothing.

    Unusable files (unreadable, not an image, a test image without a class) are listed in ``skipped``, never
    fatal; files that fail only when decoded are skipped by ingest. All images get one mode (RGB if any image
    has colour, else L) and one size (``image_size`` as (height, width), else the most common size, read from
    the headers, scaled down to a longer side of ``sizing.MAX_IMAGE_SIDE``), resized bilinearly. Each image's
    key is the sha256 of its file.
    """
    if path is None:
        raise DataError("the 'folder' source needs a directory: set data.path")
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"data.path {str(root)!r} is not a directory; point data.path at a folder "
                        "with one sub-folder of images per class")
    target_hw = _normalise_size(image_size)

    class_names = sorted(set(_class_dirs(root, {TEST_DIR, UNLABELED_DIR}))
                         | set(_class_dirs(root / TEST_DIR, {UNLABELED_DIR})))
    class_index = {name: i for i, name in enumerate(class_names)}

    records = scan_files(root, cache_file, workers)
    skipped: list[tuple[str, str]] = []
    kept: list[tuple[FileRecord, int, bool]] = []
    roles: dict[str, tuple[int, bool] | str] = {}  # by directory: a folder's files share a few of them
    for record in records:
        # The order of the checks decides the reason reported: unreadable, then misplaced, then not an image.
        directory = record.rel.rpartition("/")[0]
        role = roles.get(directory)
        if role is None:
            role = roles[directory] = _role(record.rel, class_index)
        if record.error.startswith("unreadable"):
            skipped.append((record.rel, record.error))
        elif isinstance(role, str):
            skipped.append((record.rel, role))
        elif record.error:
            skipped.append((record.rel, record.error))
        else:
            kept.append((record, role[0], role[1]))
    if not kept:
        raise DataError(f"no readable images found under {root} ({len(skipped)} skipped); put image files "
                        f"({', '.join(sorted(IMAGE_EXTENSIONS))}) in one sub-folder per class")

    if target_hw is None:
        # Most common size; ties go to the smallest so the choice never depends on file order.
        counts = Counter((r.width, r.height) for r, _, _ in kept)
        size_wh = fit_image_size(*min(counts, key=lambda wh: (-counts[wh], wh[1] * wh[0], wh)))
    else:
        size_wh = (target_hw[1], target_hw[0])
    decode_mode = "L" if all(r.mode in GREY_MODES for r, _, _ in kept) else "RGB"
    return FolderSource(
        labels=np.array([k[1] for k in kept], dtype=np.int64),
        source_ids=[k[0].rel for k in kept],
        predefined_test=np.array([k[2] for k in kept], dtype=bool),
        class_names=class_names,
        source="folder",
        source_version=folder_version(records),
        keys=[k[0].sha256 for k in kept],
        skipped=sorted(skipped),
        root=root,
        records=[k[0] for k in kept],
        size_wh=size_wh,
        decode_mode=decode_mode,
    )
