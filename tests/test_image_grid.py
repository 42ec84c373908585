"""The preview grids: every tile lands whole in its own cell, and the PNG is written."""
from __future__ import annotations

import numpy as np

from ssl_lib.image_grid import GAP, mosaic, save_image_grid


def test_each_tile_lands_whole_in_its_cell():
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (6, 6, 1), dtype=np.uint8)
    rgb = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    small = rng.integers(0, 256, (4, 4), dtype=np.uint8)
    canvas, cell_h, cell_w, band = mosaic([gray, None, rgb, small], cols=3, band_fraction=1.0)
    assert band == 6  # a caption band as tall as the tallest tile
    assert canvas.shape == (2 * cell_h, 3 * cell_w, 3) and (cell_h, cell_w) == (band + 6 + GAP, 6 + GAP)
    top, left = band, (cell_w - 6) // 2
    assert np.array_equal(canvas[top:top + 6, left:left + 6], np.repeat(gray, 3, axis=2))
    assert (canvas[:cell_h, cell_w:2 * cell_w] == 255).all()  # the empty cell stays blank
    assert np.array_equal(canvas[top:top + 6, 2 * cell_w + left:2 * cell_w + left + 6], rgb)
    small_top, small_left = cell_h + band + 1, (cell_w - 4) // 2  # centred in the larger cell
    assert np.array_equal(canvas[small_top:small_top + 4, small_left:small_left + 4, 0], small)


def test_grid_png_with_row_labels_and_empty_rows(tmp_path):
    tiles = [np.zeros((8, 8), np.uint8), None, None, None]
    save_image_grid(tiles, ["0.99", "", "", ""], cols=2, path=tmp_path / "grid.png", title="t",
                    row_labels=["a", "b"])
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    save_image_grid([None] * 4, [""] * 4, cols=2, path=tmp_path / "empty.png", title="nothing to show")
    assert (tmp_path / "empty.png").stat().st_size > 0
