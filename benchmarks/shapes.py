"""A colour image folder with classes that can be learned: coloured shapes on coloured, noisy backgrounds.

No real colour dataset can be installed on the build machines, so the generality benchmark draws one: eight
shape classes (disk, ring, square, triangle, cross, flower, bar, crescent), each at a random position, size and
rotation, in a random colour on a background of another random colour with a gradient and pixel noise. The
class is in the shape alone: colour, position and size carry no label.

    .venv/bin/python benchmarks/shapes.py OUT_DIR --per-class 375 --size 32
"""
from __future__ import annotations

import argparse
import colorsys
from pathlib import Path

import numpy as np

CLASSES = ("disk", "ring", "square", "triangle", "cross", "flower", "bar", "crescent")
SUPERSAMPLE = 3  # anti-aliased edges: each pixel is the mean of 3x3 samples


def _inside(shape: str, x: np.ndarray, y: np.ndarray, radius: float, angle: float) -> np.ndarray:
    """Whether points (x, y), relative to the shape's centre, lie inside it."""
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * x + s * y, -s * x + c * y  # rotated into the shape's frame
    d = np.hypot(x, y)
    if shape == "disk":
        return d <= radius
    if shape == "ring":
        return (d <= radius) & (d >= 0.58 * radius)
    if shape in ("square", "triangle"):
        sides = 4 if shape == "square" else 3
        inside = np.ones_like(x, dtype=bool)
        for i in range(sides):
            phi = angle + 2 * np.pi * i / sides
            inside &= np.cos(phi) * x + np.sin(phi) * y <= radius * np.cos(np.pi / sides)
        return inside
    if shape == "cross":
        arm = 0.3 * radius
        return ((np.abs(u) <= arm) & (np.abs(v) <= radius)) | ((np.abs(v) <= arm) & (np.abs(u) <= radius))
    if shape == "flower":
        return d <= radius * (0.6 + 0.4 * np.cos(5 * np.arctan2(v, u)))
    if shape == "bar":
        return (np.abs(u) <= radius) & (np.abs(v) <= 0.3 * radius)
    if shape == "crescent":
        return (d <= radius) & (np.hypot(u - 0.45 * radius, v) > 0.8 * radius)
    raise ValueError(f"unknown shape {shape!r}")


def _colour(rng: np.random.Generator) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.4, 1.0), rng.uniform(0.45, 1.0)))


def draw(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One uint8 (size, size, 3) image of ``shape``."""
    n = size * SUPERSAMPLE
    grid = (np.arange(n) + 0.5) / SUPERSAMPLE
    x, y = np.meshgrid(grid, grid)
    radius = rng.uniform(0.22, 0.36) * size
    cx, cy = (size / 2 + rng.uniform(-0.15, 0.15, 2) * size)
    mask = _inside(shape, x - cx, y - cy, radius, rng.uniform(0, 2 * np.pi)).astype(np.float64)
    mask = mask.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))[..., None]
    fg = _colour(rng)
    bg = _colour(rng)
    while np.abs(fg - bg).sum() < 0.5:  # the shape must stand out from its background
        bg = _colour(rng)
    ramp = np.linspace(-0.15, 0.15, size)
    direction = rng.uniform(0, 2 * np.pi)
    gradient = (np.cos(direction) * ramp[None, :] + np.sin(direction) * ramp[:, None])[..., None]
    image = mask * fg + (1 - mask) * np.clip(bg + gradient, 0, 1)
    image = image + rng.normal(0, 0.04, image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def write_folder(root: str | Path, per_class: int, size: int = 32, seed: int = 0) -> Path:
    """``root/<class>/<i>.png`` for every class; returns ``root``."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for shape in CLASSES:
        folder = root / shape
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(draw(shape, size, rng)).save(folder / f"{i:05d}.png")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--per-class", type=int, default=375)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_folder(args.out, args.per_class, args.size, args.seed))


if __name__ == "__main__":
    main()
