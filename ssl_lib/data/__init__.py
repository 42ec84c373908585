"""Data ingest: load a raw source, assign splits, write/read the prepared dataset.

Plain Python (numpy, pandas, pillow, scikit-learn); no orchestration imports.
"""
from __future__ import annotations

from .errors import DataError
from .idx import read_idx, write_idx
from .prepared import (
    PreparedDataset,
    channel_stats,
    ingest,
    load_pool,
    load_prepared,
    write_prepared,
)
from .sources import (
    FASHION_MNIST_CLASSES,
    SOURCES,
    RawDataset,
    load_digits,
    load_fashion_mnist,
    load_folder,
    load_source,
)
from .splits import SPLITS, assign_splits, split_counts

__all__ = [
    "DataError",
    "FASHION_MNIST_CLASSES",
    "PreparedDataset",
    "RawDataset",
    "SOURCES",
    "SPLITS",
    "assign_splits",
    "channel_stats",
    "ingest",
    "load_digits",
    "load_fashion_mnist",
    "load_folder",
    "load_pool",
    "load_prepared",
    "load_source",
    "read_idx",
    "split_counts",
    "write_idx",
    "write_prepared",
]
