"""Assign every image to one split: unlabeled, labeled, val or test (stratified, seeded)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import DataError, LabelBudgetError
from .layout import SPLITS

# Independent random streams per purpose, so e.g. raising labels_per_class keeps the same test
# and val images and only adds labeled ones (the labeled sets of a budget sweep are nested).
_TEST_STREAM, _TRAIN_STREAM = 0, 1


def _check_int(value: object, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _class_label(c: int, class_names: Sequence[str] | None) -> str:
    if class_names is not None and 0 <= c < len(class_names):
        return f"class {c} ({class_names[c]!r})"
    return f"class {c}"


def assign_splits(labels: np.ndarray, predefined_test: np.ndarray, seed: int,
                  labels_per_class: int | None, label_fraction: float | None,
                  val_per_class: int, test_fraction: float, *,
                  class_names: Sequence[str] | None = None) -> np.ndarray:
    """Return one split name per image (a str array, values from ``SPLITS``).

    test: the source's predefined test images; if it has none, ``test_fraction`` of each
    class's labeled images. Then per class, from the remaining labeled images: ``val_per_class``
    go to val, then ``labels_per_class`` (or ``max(1, round(label_fraction * n))`` where n is
    what is left after val) go to labeled, the rest to unlabeled. Images with label -1 are
    always unlabeled. ``class_names`` only makes error messages friendlier.
    """
    labels = np.asarray(labels)
    predefined_test = np.asarray(predefined_test)
    # Shape and dtype are guaranteed by RawDataset: a mismatch here is a caller's bug, not the user's data.
    if labels.ndim != 1 or predefined_test.shape != labels.shape:
        raise ValueError(f"labels and predefined_test must be 1-D and the same length, got "
                         f"{labels.shape} and {predefined_test.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers (-1 = unlabeled), got dtype {labels.dtype}")
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

    if predefined_test.any():
        is_test = predefined_test.copy()
    else:
        is_test = np.zeros(labels.shape, dtype=bool)
        for c in classes:
            members = np.flatnonzero(labels == c)
            n_test = int(round(test_fraction * len(members)))
            rng = np.random.default_rng([seed, _TEST_STREAM, int(c)])
            is_test[rng.permutation(members)[:n_test]] = True
        if test_fraction > 0 and not is_test.any():
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
        rng = np.random.default_rng([seed, _TRAIN_STREAM, int(c)])
        order = rng.permutation(members)
        splits[order[:val_per_class]] = "val"
        splits[order[val_per_class:val_per_class + n_labeled]] = "labeled"
    return splits


def split_counts(splits: np.ndarray) -> dict[str, int]:
    """Images per split, every split name present (0 if empty)."""
    return {name: int(np.sum(splits == name)) for name in SPLITS}
