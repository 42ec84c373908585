"""Batched image augmentation on tensors, on whatever device the batch lives.

Every sample gets its own random parameters, but there is no per-image Python loop: geometry is
one ``affine_grid``/``grid_sample`` call per batch and photometric ops are broadcast arithmetic.
All randomness comes from an explicit ``torch.Generator``. Parameters are drawn on the
generator's device (normally the CPU) and then moved to the batch, so a CPU generator drives a
GPU batch too and the same seed gives the same parameters on any device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class AugmentSettings:
    """Strength of the SimCLR-style view augmentation. Probabilities are per sample."""

    crop_scale: tuple[float, float] = (0.25, 1.0)  # area fraction of the random resized crop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    max_shift: float = 0.0  # extra translation, as a fraction of the image side
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4  # 3-channel images only
    grayscale_p: float = 0.2  # 3-channel images only
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 1.0)  # in pixels
    solarize_p: float = 0.0
    padding_mode: str = "zeros"  # outside the image when a crop/shift leaves it


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] -> float in [0, 1]; float input is passed through unchanged."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if not images.is_floating_point():
        raise TypeError(f"expected uint8 or float images, got {images.dtype}")
    return images


def _rand(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=generator, device=generator.device)


def _uniform(generator: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * _rand(generator, n)


def _coin(generator: torch.Generator, n: int, p: float) -> torch.Tensor:
    return _rand(generator, n) < p


def _apply_affine(x: torch.Tensor, theta: torch.Tensor, mode: str, padding_mode: str) -> torch.Tensor:
    grid = F.affine_grid(theta.to(device=x.device, dtype=x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=False)


def random_resized_crop(x: torch.Tensor, generator: torch.Generator, scale: tuple[float, float] = (0.25, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_p: float = 0.5,
                        max_shift: float = 0.0, padding_mode: str = "zeros") -> torch.Tensor:
    """Crop a random box of area ``scale`` and aspect ``ratio`` per sample and resize it back to H x W.

    Horizontal flip and an optional extra shift are folded into the same affine map, so the
    whole geometric part costs one bilinear resampling of the batch.
    """
    x = to_float(x)
    n = x.shape[0]
    area = _uniform(generator, n, *scale)
    log_r = _uniform(generator, n, math.log(ratio[0]), math.log(ratio[1]))
    r = torch.exp(log_r)
    # Box sides as fractions of the image side; clamp keeps the box inside the image.
    w = torch.sqrt(area * r).clamp(max=1.0)
    h = torch.sqrt(area / r).clamp(max=1.0)
    # The box centre in normalized [-1, 1] coordinates, anywhere that keeps the box inside.
    cx = (2 * _rand(generator, n) - 1) * (1 - w)
    cy = (2 * _rand(generator, n) - 1) * (1 - h)
    if max_shift > 0:
        cx = cx + (2 * _rand(generator, n) - 1) * 2 * max_shift
        cy = cy + (2 * _rand(generator, n) - 1) * 2 * max_shift
    sign = torch.where(_coin(generator, n, flip_p), -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=generator.device)
    theta[:, 0, 0] = w * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    return _apply_affine(x, theta, "bilinear", padding_mode)


def shift_flip(x: torch.Tensor, generator: torch.Generator, max_shift_px: int = 2, flip_p: float = 0.5,
               padding_mode: str = "zeros") -> torch.Tensor:
    """Translate each sample by a whole number of pixels in [-max_shift_px, max_shift_px] and flip it.

    This is the classic supervised augmentation (pad-and-crop plus flip); nearest sampling with
    integer shifts moves pixels without blurring them.
    """
    x = to_float(x)
    n, _, height, width = x.shape
    dx = torch.randint(-max_shift_px, max_shift_px + 1, (n,), generator=generator, device=generator.device)
    dy = torch.randint(-max_shift_px, max_shift_px + 1, (n,), generator=generator, device=generator.device)
    sign = torch.where(_coin(generator, n, flip_p), -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=generator.device)
    theta[:, 0, 0] = sign
    theta[:, 1, 1] = 1.0
    # One pixel is 2/size in normalized coordinates.
    theta[:, 0, 2] = dx.float() * 2.0 / width
    theta[:, 1, 2] = dy.float() * 2.0 / height
    return _apply_affine(x, theta, "nearest", padding_mode)


def _per_sample(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return values.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] != 3:
        return x.mean(dim=1, keepdim=True)
    luma = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * luma).sum(dim=1, keepdim=True)


def color_jitter(x: torch.Tensor, generator: torch.Generator, p: float = 0.8, brightness: float = 0.4,
                 contrast: float = 0.4, saturation: float = 0.4) -> torch.Tensor:
    """Scale brightness, contrast (around each image's mean) and, for RGB, saturation, with probability p."""
    x = to_float(x)
    n = x.shape[0]
    apply = _coin(generator, n, p)
    b = torch.where(apply, _uniform(generator, n, 1 - brightness, 1 + brightness), 1.0)
    c = torch.where(apply, _uniform(generator, n, 1 - contrast, 1 + contrast), 1.0)
    s = torch.where(apply, _uniform(generator, n, 1 - saturation, 1 + saturation), 1.0)
    x = x * _per_sample(b, x)
    mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * _per_sample(c, x) + mean
    if x.shape[1] == 3:
        gray = _grayscale(x)
        x = (x - gray) * _per_sample(s, x) + gray
    return x.clamp_(0.0, 1.0)


def random_grayscale(x: torch.Tensor, generator: torch.Generator, p: float = 0.2) -> torch.Tensor:
    """Turn RGB samples gray with probability p; other channel counts are returned unchanged."""
    if x.shape[1] != 3 or p <= 0:
        return x
    apply = _per_sample(_coin(generator, x.shape[0], p).float(), x)
    return x * (1 - apply) + _grayscale(x).expand_as(x) * apply


def gaussian_blur(x: torch.Tensor, generator: torch.Generator, p: float = 0.5,
                  sigma: tuple[float, float] = (0.1, 1.0)) -> torch.Tensor:
    """Blur each sample with probability p using its own sigma (pixels); separable, one grouped conv per axis."""
    x = to_float(x)
    n, c, height, width = x.shape
    apply = _coin(generator, n, p)
    sig = _uniform(generator, n, *sigma)
    radius = max(1, int(math.ceil(2 * sigma[1])))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets.view(1, -1) / sig.cpu().view(-1, 1)) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    identity = (offsets == 0).float().expand_as(kernel)
    kernel = torch.where(apply.cpu().view(-1, 1), kernel, identity)
    # One kernel per (sample, channel) pair; groups=n*c applies them independently.
    kernel = kernel.repeat_interleave(c, dim=0).to(device=x.device, dtype=x.dtype)
    flat = x.reshape(1, n * c, height, width)
    flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect" if min(height, width) > radius else "replicate")
    flat = F.conv2d(flat, kernel.view(n * c, 1, 1, -1), groups=n * c)
    flat = F.conv2d(flat, kernel.view(n * c, 1, -1, 1), groups=n * c)
    return flat.view(n, c, height, width)


def solarize(x: torch.Tensor, generator: torch.Generator, p: float = 0.2, threshold: float = 0.5) -> torch.Tensor:
    """Invert the pixels above ``threshold`` with probability p per sample."""
    x = to_float(x)
    apply = _per_sample(_coin(generator, x.shape[0], p).float(), x)
    solarized = torch.where(x >= threshold, 1.0 - x, x)
    return x * (1 - apply) + solarized * apply


def augment_views(x: torch.Tensor, generator: torch.Generator,
                  settings: AugmentSettings = AugmentSettings()) -> torch.Tensor:
    """The SimCLR view pipeline: crop+flip, colour jitter, grayscale, blur, solarize. Output float in [0, 1]."""
    s = settings
    out = random_resized_crop(x, generator, s.crop_scale, s.crop_ratio, s.flip_p, s.max_shift, s.padding_mode)
    if s.jitter_p > 0:
        out = color_jitter(out, generator, s.jitter_p, s.brightness, s.contrast, s.saturation)
    out = random_grayscale(out, generator, s.grayscale_p)
    if s.blur_p > 0:
        out = gaussian_blur(out, generator, s.blur_p, s.blur_sigma)
    if s.solarize_p > 0:
        out = solarize(out, generator, s.solarize_p)
    return out.clamp(0.0, 1.0)


def random_affine(x: torch.Tensor, generator: torch.Generator, degrees: float = 15.0, shear: float = 0.15,
                  scale: tuple[float, float] = (0.85, 1.1), max_shift: float = 0.125, flip_p: float = 0.5,
                  padding_mode: str = "zeros") -> torch.Tensor:
    """Rotate, shear, scale, translate (``max_shift`` of the side) and flip each sample: one resampling."""
    x = to_float(x)
    n = x.shape[0]
    angle = _uniform(generator, n, -degrees, degrees) * (math.pi / 180.0)
    sh = _uniform(generator, n, -shear, shear)
    zoom = _uniform(generator, n, *scale)
    sign = torch.where(_coin(generator, n, flip_p), -1.0, 1.0)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.zeros(n, 2, 3, device=generator.device)
    theta[:, 0, 0] = cos * sign
    theta[:, 0, 1] = -sin + sh * cos
    theta[:, 1, 0] = sin * sign
    theta[:, 1, 1] = cos + sh * sin
    theta[:, 0, 2] = (2 * _rand(generator, n) - 1) * 2 * max_shift
    theta[:, 1, 2] = (2 * _rand(generator, n) - 1) * 2 * max_shift
    return _apply_affine(x, theta, "bilinear", padding_mode)


def cutout(x: torch.Tensor, generator: torch.Generator, max_size: float = 0.5, p: float = 1.0,
           fill: float = 0.5) -> torch.Tensor:
    """Fill one random square per sample (side up to ``max_size`` of the image) with ``fill`` (DeVries, 2017)."""
    x = to_float(x)
    n, _, height, width = x.shape
    apply = _coin(generator, n, p)
    side = _uniform(generator, n, 0.0, max_size)
    cy, cx = _rand(generator, n), _rand(generator, n)
    ys = (torch.arange(height, dtype=torch.float32, device=generator.device) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float32, device=generator.device) + 0.5) / width
    inside_y = (ys.view(1, -1) - cy.view(-1, 1)).abs() <= side.view(-1, 1) / 2
    inside_x = (xs.view(1, -1) - cx.view(-1, 1)).abs() <= side.view(-1, 1) / 2
    mask = (inside_y.unsqueeze(2) & inside_x.unsqueeze(1) & apply.view(-1, 1, 1)).unsqueeze(1).to(x.device)
    return torch.where(mask, torch.full_like(x, fill), x)


def strong_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """FixMatch's strong view, batched: affine + flip, brightness/contrast, sometimes solarize or blur,
    then cutout. Output float in [0, 1]."""
    out = random_affine(x, generator)
    out = color_jitter(out, generator, p=0.8, brightness=0.5, contrast=0.5, saturation=0.5)
    out = solarize(out, generator, p=0.1)
    out = gaussian_blur(out, generator, p=0.2, sigma=(0.1, 1.0))
    return cutout(out, generator, max_size=0.5).clamp_(0.0, 1.0)


def nhwc_to_tensor(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 NHWC numpy array -> uint8 NCHW tensor on ``device`` (no copy to float)."""
    images = np.asarray(images)
    if not images.flags.writeable:  # e.g. np.frombuffer / memmap; torch warns on read-only memory
        images = images.copy()
    t = torch.from_numpy(images)
    if t.ndim == 3:  # (N, H, W) grayscale without a channel axis
        t = t.unsqueeze(-1)
    return t.permute(0, 3, 1, 2).contiguous().to(device)


def tensor_to_nhwc_uint8(x: torch.Tensor) -> np.ndarray:
    """float [0, 1] NCHW tensor -> uint8 NHWC numpy array."""
    return (to_float(x).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
