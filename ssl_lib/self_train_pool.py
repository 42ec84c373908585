"""Self-training on a prepared dataset: the pool it trains on, and the pseudo-labels it gave that pool as a table and
as a picture. What the self_train stage, and the benchmarks that self-train as it does, put around
``ssl_lib.self_train.self_train``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from ssl_lib.data.prepared import PreparedDataset
    from ssl_lib.self_train import PseudoLabels

# Per pool image: its dataset row and source id, the pseudo-label (class index and name), the target's confidence,
# its weight in training and whether it was used (weight > 0).
PSEUDO_LABEL_COLUMNS = ["index", "source_id", "label", "class", "confidence", "weight", "used"]


def pool_rows(splits: np.ndarray) -> np.ndarray:
    """Dataset rows self-training may train on: unlabeled and labeled, never val or test."""
    return np.flatnonzero((splits == "unlabeled") | (splits == "labeled"))


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no plain ==
class SelfTrainPool:
    """A prepared dataset's self-training pool: its rows, and where the labeled images are among them."""

    data: PreparedDataset
    rows: np.ndarray  # dataset rows (``pool_rows``), ascending
    labeled: np.ndarray  # positions of the labeled images within the pool
    labels: np.ndarray  # their classes

    @classmethod
    def of(cls, data: PreparedDataset) -> SelfTrainPool:
        splits = data.manifest["split"].to_numpy()
        rows = pool_rows(splits)
        labeled = np.flatnonzero(splits[rows] == "labeled")
        return cls(data=data, rows=rows, labeled=labeled,
                   labels=data.manifest["label"].to_numpy(dtype=np.int64)[rows][labeled])

    @property
    def size(self) -> int:
        return len(self.rows)

    def images(self) -> np.ndarray:
        """The pool's images (uint8 NHWC), read into memory: a separate step, as a run that self-trains with no
        method needs none of them."""
        return np.asarray(self.data.images[self.rows])


def pseudo_label_table(pool: SelfTrainPool, pseudo: PseudoLabels | None) -> pd.DataFrame:
    """``pseudo`` (the last step's pseudo-labels of ``pool``) as rows of ``PSEUDO_LABEL_COLUMNS``; no rows for
    None (nothing ran)."""
    if pseudo is None:
        return pd.DataFrame(columns=PSEUDO_LABEL_COLUMNS)
    class_names = pool.data.class_names
    return pd.DataFrame({"index": pool.rows, "source_id": pool.data.manifest["source_id"].to_numpy()[pool.rows],
                         "label": pseudo.label, "class": [class_names[i] for i in pseudo.label],
                         "confidence": pseudo.confidence.round(5), "weight": pseudo.weight.round(5),
                         "used": pseudo.weight > 0})


def save_pseudo_label_preview(images: np.ndarray, label: np.ndarray, confidence: np.ndarray, class_names: list[str],
                              path: str | Path, per_side: int = 4) -> None:
    """A PNG, one row per class: its ``per_side`` most confident pool images, then its least confident ones."""
    from ssl_lib.image_grid import save_image_grid

    tiles: list[np.ndarray | None] = []
    captions: list[str] = []
    for c in range(len(class_names)):
        members = np.flatnonzero(label == c)
        ranked = members[np.argsort(-confidence[members], kind="stable")]
        picks = list(ranked[:per_side]) + [None] * (per_side - min(per_side, len(ranked)))
        picks += list(ranked[-per_side:][::-1]) if len(ranked) > per_side else [None] * per_side
        tiles += [None if i is None else images[i] for i in picks]
        captions += ["" if i is None else f"{confidence[i]:.2f}" for i in picks]
    save_image_grid(tiles, captions, cols=2 * per_side, path=path, row_labels=class_names, dpi=90,
                    title="pseudo-labels per class: most confident (left) and least confident (right)")
