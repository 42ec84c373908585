"""Captioned grids of small images as one PNG: the previews of pretext targets and of pseudo-labels.

The tiles are pasted into one mosaic and drawn with a single ``imshow``; the captions are text on that one
axes. A grid of separate subplots (one axes per tile, then ``tight_layout``) costs seconds of matplotlib
layout per figure (80 tiles: ~5 CPU-s against ~0.3 s as a mosaic), and every pipeline run draws two.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ssl_lib.io import atomic_path

GAP = 2  # pixels of background between tiles
CAPTION_BAND = 0.4  # height of the caption band above each tile, as a fraction of the tile height
CELL_INCHES = 1.1  # printed width of one cell


def _as_rgb(tile: np.ndarray) -> np.ndarray:
    tile = np.asarray(tile, dtype=np.uint8)
    if tile.ndim == 2:
        tile = tile[..., None]
    return np.repeat(tile, 3, axis=2) if tile.shape[2] == 1 else tile[..., :3]


class Mosaic(NamedTuple):
    canvas: np.ndarray  # RGB uint8
    cell_h: int
    cell_w: int
    band: int           # blank pixels above each tile, for its caption


def mosaic(tiles: Sequence[np.ndarray | None], cols: int, band_fraction: float = 0.0) -> Mosaic:
    """The tiles (uint8 HxW, HxWx1 or HxWx3; None leaves a cell empty) row-major in ``cols`` columns on white,
    each centred below a band of blank pixels (``band_fraction`` of the tallest tile, at least 4 pixels when
    asked for) in a cell as large as the largest tile."""
    shown = [_as_rgb(t) for t in tiles if t is not None]
    tile_h = max((t.shape[0] for t in shown), default=1)
    band = max(4, round(band_fraction * tile_h)) if band_fraction > 0 else 0
    cell_h = band + tile_h + GAP
    cell_w = max((t.shape[1] for t in shown), default=1) + GAP
    rows = max(1, math.ceil(len(tiles) / cols))
    canvas = np.full((rows * cell_h, cols * cell_w, 3), 255, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        if tile is None:
            continue
        tile = _as_rgb(tile)
        top = (i // cols) * cell_h + band + (tile_h - tile.shape[0]) // 2
        left = (i % cols) * cell_w + (cell_w - tile.shape[1]) // 2
        canvas[top:top + tile.shape[0], left:left + tile.shape[1]] = tile
    return Mosaic(canvas, cell_h, cell_w, band)


def save_image_grid(tiles: Sequence[np.ndarray | None], captions: Sequence[str], cols: int, path: str | Path,
                    title: str, row_labels: Sequence[str] | None = None, dpi: int = 100) -> None:
    """Write ``tiles`` as a PNG grid, each with its caption above it, rows optionally labelled on the left."""
    import matplotlib

    matplotlib.use("Agg")  # here, not at import: importing this module must not change global state
    import matplotlib.pyplot as plt

    canvas, cell_h, cell_w, band = mosaic(tiles, cols, CAPTION_BAND)
    inches_per_px = CELL_INCHES / cell_w
    grid_w, grid_h = canvas.shape[1] * inches_per_px, canvas.shape[0] * inches_per_px
    left = 1.0 if row_labels else 0.1  # inches left of the grid, for the row labels
    top, bottom, right = 0.45, 0.1, 0.1
    width, height = left + grid_w + right, bottom + grid_h + top
    fig = plt.figure(figsize=(width, height))
    ax = fig.add_axes((left / width, bottom / height, grid_w / width, grid_h / height))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    for i, caption in enumerate(captions):
        if caption and i < len(tiles) and tiles[i] is not None:
            ax.text((i % cols + 0.5) * cell_w - 0.5, (i // cols) * cell_h + band / 2, caption, ha="center",
                    va="center", fontsize=7)
    for r, label in enumerate(row_labels or []):
        ax.text(-0.1 * cell_w, (r * cell_h) + band + (cell_h - band) / 2, label, ha="right", va="center",
                fontsize=8, clip_on=False)
    fig.suptitle(title, fontsize=9, y=1 - 0.12 / height, va="top")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
