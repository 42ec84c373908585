"""Decoding one image file into a model's pixel layout, and reading a file's header without decoding it.

PIL is imported inside the functions: importing this module stays cheap for code that never decodes.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

# Modes whose pixels cannot hold colour: a folder of only these is decoded straight to grey.
GREY_MODES: frozenset[str] = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
# EXIF orientations that rotate by 90 degrees: the upright image has width and height swapped.
_TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})
_ORIENTATION_TAG = 0x0112


def open_image(path: str | os.PathLike[str]):  # -> PIL.Image.Image, kept untyped so PIL is imported lazily
    """The decoded, upright image in ``path``; raises whatever PIL raises for a bad file."""
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img.load()  # decode now so a truncated file fails here, not later
        # Copy before the file closes: a closed PIL image refuses all further operations.
        upright = ImageOps.exif_transpose(img)
        return upright if upright is not None else img.copy()


def to_array(img, mode: str, size_wh: tuple[int, int]) -> np.ndarray:
    """``img`` as uint8 (H, W, C) in ``mode`` ("L" or "RGB"), resized bilinearly to ``size_wh`` (width, height)."""
    from PIL import Image

    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Flatten transparency onto white; a plain convert would expose arbitrary hidden colours.
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    elif img.mode in ("I", "I;16", "F"):
        # Wide grey modes: PIL's convert("L") clips instead of rescaling, so rescale by hand.
        values = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode == "I;16" or values.max() > 255 else 255.0
        img = Image.fromarray(np.rint(values.clip(0, top) * (255.0 / top)).astype(np.uint8))
    img = img.convert(mode)
    if img.size != size_wh:
        img = img.resize(size_wh, Image.Resampling.BILINEAR)
    array = np.asarray(img, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def is_colour(pixels: np.ndarray) -> bool:
    """Whether decoded uint8 (..., C) pixels (one image or several) hold colour: 3 channels not all equal.

    A colour-mode file with equal channels (a grey JPEG saved as RGB) is grey. Judged on the decoded, resized
    pixels, so it can be read back from a prepared images.npy.
    """
    if pixels.shape[-1] != 3:
        return False
    return bool(np.any(pixels[..., 0] != pixels[..., 1]) or np.any(pixels[..., 1] != pixels[..., 2]))


def probe(data: bytes, path: str | os.PathLike[str]) -> tuple[int, int, str]:
    """(width, height, mode) of the image in ``data`` (the bytes of ``path``), upright, from its header alone.

    Raises what PIL raises when the header is not an image's, with the message naming ``path``.
    """
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
    except Exception:
        # Open the path itself so the error names the file, as decoding it would.
        with Image.open(Path(path)):
            pass
        raise
    with img:
        width, height = img.size
        exif = img.info.get("exif")  # read only what the header holds: PNG's getexif() would decode the image
        if exif:
            try:
                orientation = Image.Exif()
                orientation.load(exif)
                if orientation.get(_ORIENTATION_TAG) in _TRANSPOSED_ORIENTATIONS:
                    width, height = height, width
            except Exception:  # a broken EXIF block: decoding ignores it as well
                pass
        return width, height, img.mode
