"""Checks the flow and the CLI run before any stage: can the data serve these params?

Not stage work (no stage imports this module, and dvc.yaml lists it for none): it reads the source once,
writes nothing, and turns an impossible combination into one UserError before any compute. What it learns of
the data (pool, splits, image shape) is what the run's plan (``ssl_lib.plan``) is made from.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ssl_lib.config import PipelineParams
from ssl_lib.plan import DataShape


def check_label_budget(params: PipelineParams, root: Path | None = None) -> DataShape:
    """Fail before any compute when the data cannot serve the params, with a UserError naming the fix; return
    the data's shape as the run will see it.

    A class without an image, or a source of one class, raises DataError (``check_classes``); a label budget
    the classes cannot meet raises LabelBudgetError (from assign_splits), a method that cannot
    use these images MethodRequirementError. It lists the source without decoding a folder's images (file
    hashes from the cache of the project at ``root``) and writes nothing, so a bad budget leaves no partial
    outputs. Files that fail only when decoded are counted here; ingest, which drops them, checks the budget
    again.
    """
    from ssl_lib.data.sources import RawDataset, check_classes, load_source
    from ssl_lib.data.splits import assign_splits
    from tasks import paths

    data = params.data
    raw = load_source(data.source, data.path, image_size=data.image_size,
                      cache_file=None if root is None else root / paths.SOURCE_HASH_CACHE)
    check_classes(raw)  # before the budget: an empty class would only show up as a budget it cannot meet
    splits = assign_splits(raw.labels, raw.predefined_test, params.seed, data.labels_per_class,
                           data.label_fraction, data.val_per_class, data.test_fraction, keys=raw.keys,
                           class_names=raw.class_names)
    from ssl_lib.errors import MethodRequirementError
    from ssl_lib.methods import get_method

    needed = get_method(params.pretrain.method).required_channels
    # A folder holding no file that can store colour is grey; one that does is decoded as RGB (and narrowed to
    # grey by ingest only if every image turns out grey: the method's own check catches that).
    if isinstance(raw, RawDataset):
        height, width, channels = (int(d) for d in raw.images.shape[1:])
    else:
        (width, height), channels = raw.size_wh, 3 if raw.decode_mode == "RGB" else 1
    if needed and channels != needed:
        raise MethodRequirementError(
            f"pretrain.method {params.pretrain.method!r} needs {needed}-channel images, but data.source "
            f"{data.source!r} has {channels}: use a colour dataset (e.g. data.source=folder with "
            "RGB images) or another method")

    return DataShape.from_splits(np.asarray(splits), len(raw.class_names), height, width, channels)
