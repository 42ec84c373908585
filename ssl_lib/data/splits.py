"""Assign every image to one split: unlabeled, labeled, val or test (stratified, seeded, stable as data grows).

Test: whether an image is a test image depends only on the seed and the image's own identity, never on which
other images exist, so across data versions a test image never becomes a training image and a training image
never becomes a test image. The identity is
  - a content key (``keys``, e.g. the sha256 of an image file): the image is test when a seeded hash of its key
    falls below ``test_fraction``. A folder can grow, shrink or be reordered; the hash does not care.
  - its position (``keys=None``), for fixed releases (digits, Fashion-MNIST): they never change, so a seeded
    permutation of each class is a function of the seed and the image's id. Their splits are the ones they always
    had.
Val and labeled: per class, from the non-test images. Roles an image had in the previous data version
(``previous``) are kept; what the budget still needs is filled from the images new in this version, then from
the old unlabeled ones, in seeded order. So a growing class keeps its labeled and val images, and the first ingest
(everything new) is the plain seeded draw.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from .errors import DataError, LabelBudgetError
from .layout import SPLITS

# Independent random streams per purpose, so e.g. raising labels_per_class keeps the same test
# and val images and only adds labeled ones (the labeled sets of a budget sweep are nested).
_TEST_STREAM, _TRAIN_STREAM = 0, 1
_NEW = ""  # ``previous`` entry of an image the previous data version did not have


def _check_int(value: object, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _class_label(c: int, class_names: Sequence[str] | None) -> str:
    if class_names is not None and 0 <= c < len(class_names):
        return f"class {c} ({class_names[c]!r})"
    return f"class {c}"


def content_scores(seed: int, stream: int, keys: Sequence[str]) -> np.ndarray:
    """A uniform number in [0, 1) per key, from a hash of (seed, stream, key): the same key always scores the same.

    The score is the 8-byte blake2b digest of ``seed\\0stream\\0key`` as a big-endian integer over 2**64.
    """
    prefix = f"{seed}\0{stream}\0".encode()
    blake2b = hashlib.blake2b
    # One bytes object for all digests, read by numpy at once: a Python int and a numpy store per key cost as much
    # as the hash. uint64 -> float64 rounds to nearest, as int / float does.
    digests = b"".join([blake2b(prefix + key.encode(), digest_size=8).digest() for key in keys])
    return np.frombuffer(digests, dtype=">u8").astype(np.float64) / 2.0**64


def _scores(seed: int, stream: int, c: int, members: np.ndarray, keys: Sequence[str] | None) -> np.ndarray:
    """Seeded order of ``members`` (indices of one class): lower first."""
    if keys is None:
        # Position identity (fixed releases): the rank in the seeded permutation of the class, as splits always were.
        order = np.random.default_rng([seed, stream, c]).permutation(len(members))
        ranks = np.empty(len(members), dtype=np.float64)
        ranks[order] = np.arange(len(members))
        return ranks
    return content_scores(seed, stream, [keys[i] for i in members])


def _test_mask(labels: np.ndarray, predefined_test: np.ndarray, seed: int, test_fraction: float,
               keys: Sequence[str] | None, classes: np.ndarray) -> np.ndarray:
    if predefined_test.any():
        return predefined_test.copy()
    is_test = np.zeros(labels.shape, dtype=bool)
    if keys is not None:
        # Per image, never per set: the same image is test (or not) in every data version.
        is_test = (labels >= 0) & (content_scores(seed, _TEST_STREAM, keys) < test_fraction)
        return is_test
    for c in classes:
        members = np.flatnonzero(labels == c)
        n_test = int(round(test_fraction * len(members)))
        ranks = _scores(seed, _TEST_STREAM, int(c), members, None)
        is_test[members[ranks < n_test]] = True
    return is_test


def _pick(count: int, kept: np.ndarray, candidates: list[np.ndarray], score: np.ndarray) -> np.ndarray:
    """Up to ``count`` positions: the kept ones first (best scores if too many), then each candidate group in turn."""
    chosen = kept[np.argsort(score[kept], kind="stable")][:count]
    for group in candidates:
        if len(chosen) >= count:
            break
        group = group[~np.isin(group, chosen)]
        group = group[np.argsort(score[group], kind="stable")]
        chosen = np.concatenate([chosen, group[:count - len(chosen)]])
    return chosen


def assign_splits(labels: np.ndarray, predefined_test: np.ndarray, seed: int,
                  labels_per_class: int | None, label_fraction: float | None,
                  val_per_class: int, test_fraction: float, *,
                  keys: Sequence[str] | None = None, previous: Sequence[str] | np.ndarray | None = None,
                  class_names: Sequence[str] | None = None) -> np.ndarray:
    """Return one split name per image (a str array, values from ``SPLITS``).

    test: the source's predefined test images; if it has none, about ``test_fraction`` of the labeled images,
    chosen per image from its identity (module docstring: exactly round(test_fraction * n) per class for fixed
    releases). Then per class, from the remaining labeled images: ``val_per_class`` go to val, then
    ``labels_per_class`` (or ``max(1, round(label_fraction * n))`` where n is what is left after val) go to
    labeled, the rest to unlabeled. Images with label -1 are always unlabeled.

    ``keys``: one identity per image (None: fixed release, identity by position). ``previous``: each image's
    split in the previous data version ("" for images new in this one; None: a first ingest); its val and labeled
    roles are kept. ``class_names`` only makes error messages friendlier.
    """
    labels = np.asarray(labels)
    predefined_test = np.asarray(predefined_test)
    # Shape and dtype are guaranteed by the sources: a mismatch here is a caller's bug, not the user's data.
    if labels.ndim != 1 or predefined_test.shape != labels.shape:
        raise ValueError(f"labels and predefined_test must be 1-D and the same length, got "
                         f"{labels.shape} and {predefined_test.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers (-1 = unlabeled), got dtype {labels.dtype}")
    if keys is not None and len(keys) != len(labels):
        raise ValueError(f"got {len(keys)} keys for {len(labels)} images")
    prev = np.full(labels.shape, _NEW, dtype="<U9") if previous is None else np.asarray(previous, dtype="<U9")
    if prev.shape != labels.shape:
        raise ValueError(f"got {prev.shape} previous splits for {labels.shape} images")
    labels = labels.astype(np.int64)
    predefined_test = predefined_test.astype(bool)
    seed = _check_int(seed, "seed", 0)
    val_per_class = _check_int(val_per_class, "data.val_per_class", 0)

    if (labels_per_class is None) == (label_fraction is None):
        raise DataError("set exactly one of data.labels_per_class (images per class) and "
                        "data.label_fraction (fraction per class); set the other to null")
    if labels_per_class is not None:
        labels_per_class = _check_int(labels_per_class, "data.labels_per_class", 1)
    elif isinstance(label_fraction, bool) or not isinstance(label_fraction, (int, float)) \
            or not 0.0 < label_fraction <= 1.0:
        raise DataError(f"data.label_fraction must be in (0, 1], got {label_fraction!r}")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) \
            or not 0.0 <= test_fraction < 1.0:
        raise DataError(f"data.test_fraction must be in [0, 1), got {test_fraction!r}")

    if np.any(predefined_test & (labels < 0)):
        raise DataError(f"{int(np.sum(predefined_test & (labels < 0)))} predefined test images have no "
                        "label; test images must be labeled (move them out of the test set)")

    splits = np.full(labels.shape, "unlabeled", dtype="<U9")
    classes = np.unique(labels[labels >= 0])
    if not classes.size:
        # Fine-tuning and evaluation need labels; without this, a folder of loose images would only fail
        # stages later, inside training.
        raise LabelBudgetError("the source has no labeled images: put the images of each class in their own "
                               "sub-folder of data.path (data.path/<class>/...)")

    is_test = _test_mask(labels, predefined_test, seed, test_fraction, keys, classes)
    if test_fraction > 0 and not predefined_test.any() and not is_test.any():
        # Every class is so small that its share rounds to 0: evaluation would have nothing to score.
        raise LabelBudgetError(f"data.test_fraction={test_fraction} gives no test image (the classes are "
                               "too small); raise data.test_fraction, add labeled images, or put test "
                               "images in data.path/test/<class>/")
    splits[is_test] = "test"

    for c in classes:
        members = np.flatnonzero((labels == c) & ~is_test)
        n = len(members)
        if labels_per_class is not None:
            n_labeled = labels_per_class
        else:
            n_labeled = max(1, int(round(label_fraction * (n - val_per_class))))  # type: ignore[operator]
        if n < val_per_class + n_labeled:
            budget = (f"labels_per_class={labels_per_class}" if labels_per_class is not None
                      else f"label_fraction={label_fraction} (at least 1 image)")
            raise LabelBudgetError(
                f"{_class_label(int(c), class_names)} has only {n} non-test images, fewer than "
                f"val_per_class={val_per_class} + {budget}; lower data.labels_per_class / "
                "data.val_per_class (or use data.label_fraction)")
        score = _scores(seed, _TRAIN_STREAM, int(c), members, keys)
        role = prev[members]
        new = np.flatnonzero(role == _NEW)
        # Old images that hold no role to keep: unlabeled before, or test before a test_fraction change.
        old_free = np.flatnonzero((role != _NEW) & (role != "val") & (role != "labeled"))
        was_val, was_labeled = np.flatnonzero(role == "val"), np.flatnonzero(role == "labeled")
        val = _pick(val_per_class, was_val, [new, old_free, was_labeled], score)
        still_labeled = was_labeled[~np.isin(was_labeled, val)]
        rest = [g[~np.isin(g, val)] for g in (new, old_free, was_val)]
        labeled = _pick(n_labeled, still_labeled, rest, score)
        splits[members[val]] = "val"
        splits[members[labeled]] = "labeled"
    return splits


def split_counts(splits: np.ndarray) -> dict[str, int]:
    """Images per split, every split name present (0 if empty)."""
    return {name: int(np.sum(splits == name)) for name in SPLITS}
