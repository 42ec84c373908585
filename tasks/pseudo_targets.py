"""The pseudo_labels stage's targets, read back: what pretrain loads.

Apart from the stage module, so that pretrain's code deps hold only the reader: editing how the stage draws
its preview reruns pseudo_labels, not pretraining.
"""
from __future__ import annotations

import numpy as np

from tasks import paths


def load_pseudo_labels() -> dict[str, np.ndarray]:
    from ssl_lib.errors import DataError

    if not paths.PSEUDO_TARGETS.is_file():
        raise DataError(f"{paths.PSEUDO_TARGETS} is missing; run the stage first: dvc repro pseudo_labels")
    with np.load(paths.PSEUDO_TARGETS) as archive:
        return {key: archive[key] for key in archive.files}
