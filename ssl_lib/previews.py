"""What a method trains on, drawn: a PNG grid of its pretext inputs and targets (the pseudo_labels stage's preview)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ssl_lib.image_grid import save_image_grid
from ssl_lib.methods import get_method


def save_preview(method_name: str, images_uint8: np.ndarray, pseudo: dict[str, np.ndarray],
                 path: str | Path, count: int, options: dict[str, Any] | None = None) -> None:
    """Write a PNG grid of what ``method_name`` trains on. ``images_uint8`` must be aligned with
    ``pseudo`` (i.e. the pretraining subset, in order)."""
    pairs = get_method(method_name).preview_pairs(np.asarray(images_uint8), pseudo, count, options)
    save_image_grid([image for image, _ in pairs], [caption for _, caption in pairs], cols=8, path=path,
                    title=f"{method_name}: training inputs")
