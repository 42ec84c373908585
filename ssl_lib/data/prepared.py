"""Reading the prepared dataset (layout in ``ssl_lib.data.layout``, written by ``ssl_lib.data.ingest``)."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import DataError
from .layout import IMAGES_FILE, MANIFEST_COLUMNS, MANIFEST_FILE, META_FILE, POOL_FILE, SPLITS, read_manifest

_FIX = "run the ingest stage: dvc repro ingest"
SEEN_KEYS_FILE = "seen_keys.npy"  # the name a model's seen keys are recorded under (``PreparedDataset.seen_keys``)


def key_digests(keys: Sequence[str]) -> np.ndarray:
    """A 64-bit digest of each image key (manifest's ``key``): compact enough to record with every model."""
    return np.array([int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "big") for k in keys],
                    dtype=np.uint64)


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

    def seen_keys(self) -> np.ndarray:
        """Sorted key digests of every image a model built on this data may have trained or been selected on.

        That is every non-test image: pretraining and self-training use the unlabeled ones too. A model recorded
        with these can later be compared with another only on test images neither has seen.
        """
        keys = self.manifest["key"].to_numpy()[self.manifest["split"].to_numpy() != "test"]
        return np.unique(key_digests(keys.tolist()))

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
        manifest = read_manifest(root / MANIFEST_FILE)
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
