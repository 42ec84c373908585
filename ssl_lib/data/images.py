"""Read arbitrary image files into a model's input layout, one unreadable file never stopping the batch."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .decode import open_image, to_array
from .errors import DataError
from .files import IMAGE_EXTENSIONS, walk_images


@dataclass(frozen=True)
class ImageBatch:
    paths: list[str]                 # readable files, relative to the root, in order
    images: np.ndarray               # uint8 (N, H, W, C)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def list_images(root: str | os.PathLike[str]) -> list[str]:
    """Image files under ``root`` (recursively, sorted), relative to it; a single file is its own list."""
    root = Path(root)
    if root.is_file():
        return [root.name] if root.suffix.lower() in IMAGE_EXTENSIONS else []
    if not root.is_dir():
        raise DataError(f"{str(root)!r} is neither a folder of images nor an image file")
    return walk_images(root)


def read_images(root: str | os.PathLike[str], channels: int, height: int, width: int) -> ImageBatch:
    """Every image under ``root`` converted to ``channels`` (1 = grey, 3 = RGB) and resized to height x width."""
    if channels not in (1, 3):
        raise DataError(f"models here take 1 or 3 channels, not {channels}")
    root = Path(root)
    base = root.parent if root.is_file() else root
    mode = "L" if channels == 1 else "RGB"
    paths, arrays, failed = [], [], []
    for rel in list_images(root):
        try:
            arrays.append(to_array(open_image(base / rel), mode, (width, height)))
            paths.append(rel)
        except Exception as err:  # any decoder error means "unreadable"; it is reported, not raised
            failed.append((rel, f"{type(err).__name__}: {err}"))
    images = np.stack(arrays) if arrays else np.zeros((0, height, width, channels), dtype=np.uint8)
    return ImageBatch(paths=paths, images=images, failed=failed)
