"""Helpers shared by the pretext and generative methods: encoder unwrapping and checks, per-sample
seeded noise, a light pixel decoder from pooled features, and preview drawing."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import nn

from ssl_lib.errors import MethodRequirementError

_LUMA = (0.299, 0.587, 0.114)


def augment_option() -> Any:
    """The ``augment`` option of the methods that shift and flip their inputs (one description for all)."""
    return Field(True, description="shift and flip each image (shift_flip) before the task")


def max_shift_option(default: int) -> Any:
    """The ``max_shift_px`` option that goes with ``augment_option``."""
    return Field(default, ge=0, description="largest shift of that augmentation, in pixels")


def unwrap_encoder(encoder: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(normalize, bare_encoder)``: splits a ``NormalizedEncoder``; anything else gets an identity."""
    from ssl_lib.models.backbones import NormalizedEncoder

    if isinstance(encoder, NormalizedEncoder):
        return encoder.normalize, encoder.encoder
    return nn.Identity(), encoder


def require_vit(encoder: nn.Module, method: str):
    """``(normalize, vit)`` for a method that drives ViT tokens; MethodRequirementError for any other backbone."""
    from ssl_lib.models.vit import ViT

    normalize, bare = unwrap_encoder(encoder)
    if not isinstance(bare, ViT):
        raise MethodRequirementError(f"method {method} needs backbone vit_tiny (a ssl_lib.models.vit.ViT), "
                                     f"got {type(bare).__name__}; set pretrain.backbone=vit_tiny")
    return normalize, bare


def probe_encoder(encoder: nn.Module, in_channels: int, height: int, width: int, feature_dim: int,
                  what: str) -> None:
    """Run a dummy (2, C, H, W) batch through the encoder in eval mode (no BatchNorm statistics
    change); a crash or a wrong output shape becomes a MethodRequirementError that says ``what`` failed."""
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            param = next(encoder.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
            out = encoder(torch.zeros(2, in_channels, height, width, device=device))
    except Exception as exc:  # re-raised with context: the fix is another backbone, image size or option
        raise MethodRequirementError(f"{what}: the backbone cannot encode {height}x{width} inputs ({exc})") from exc
    finally:
        encoder.train(was_training)
    if tuple(out.shape) != (2, feature_dim):
        raise MethodRequirementError(f"{what}: the backbone maps {height}x{width} inputs to "
                                     f"{tuple(out.shape[1:])}, expected ({feature_dim},)")


def sample_seeds(seed: int, salt: int, epochs: int, num_images: int) -> np.ndarray:
    """(epochs, N) int64 seeds, one per sample and epoch, for per-sample randomness fixed in pseudo-labels.

    ``salt`` keeps the streams of different methods apart for the same run seed.
    """
    return np.random.default_rng([seed, salt]).integers(0, 2**62, size=(epochs, num_images), dtype=np.int64)


def weighted_patch_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                       norm_pix: bool) -> torch.Tensor:
    """sum_{b,l} w_{b,l} * mean_j (pred - t)^2 / sum w, with t per-patch standardized when ``norm_pix``.

    The pixel loss shared by MAE (w = mask of removed patches) and next-patch prediction (w = scored patches).
    """
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = (pred - target).pow(2).mean(dim=-1)
    return (per_patch * weight).sum() / weight.sum().clamp_min(1.0)


def per_sample_uniform(seeds: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n) float32 uniforms in [0, 1) on the CPU, row i drawn from a generator seeded by seeds[i].

    A sample's draw depends only on its own seed, not on the batch it lands in or the device.
    """
    rows = []
    for s in seeds.detach().cpu().tolist():
        rows.append(torch.rand(n, generator=torch.Generator().manual_seed(int(s))))
    return torch.stack(rows) if rows else torch.zeros(0, n)


def square_mask(seeds: torch.Tensor, height: int, width: int, size: int) -> torch.Tensor:
    """(B, 1, H, W) float mask, 1 inside one size x size square per sample placed by its seed."""
    u = per_sample_uniform(seeds, 2)
    top = (u[:, 0] * (height - size + 1)).long()
    left = (u[:, 1] * (width - size + 1)).long()
    rows = torch.arange(height)[None, :]
    cols = torch.arange(width)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + size)
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + size)
    return (in_rows[:, :, None] & in_cols[:, None, :]).float()[:, None]


class FeatureDecoder(nn.Module):
    """Light decoder from pooled features (B, D) to an image (B, C, S, S).

    Linear to a (width, s0, s0) map with s0 = ceil(S / 4), then two (upsample x2, 3x3 conv, BN,
    ReLU) stages halving the width, and a 3x3 conv to ``out_channels``; cropped to S x S. Working on
    pooled features keeps it independent of the backbone (convnet, resnet18, vit_tiny).
    """

    def __init__(self, feature_dim: int, out_channels: int, image_size: int, width: int = 64,
                 out_activation: str = "sigmoid") -> None:
        super().__init__()
        if out_activation not in ("sigmoid", "none"):
            raise ValueError(f"out_activation must be 'sigmoid' or 'none', got {out_activation!r}")
        self.image_size, self.width, self.out_activation = image_size, width, out_activation
        self.s0 = -(-image_size // 4)
        w2, w4 = max(4, width // 2), max(4, width // 4)
        self.fc = nn.Linear(feature_dim, width * self.s0 * self.s0)
        self.net = nn.Sequential(
            nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(width, w2, 3, padding=1, bias=False), nn.BatchNorm2d(w2), nn.ReLU(inplace=True),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(w2, w4, 3, padding=1, bias=False), nn.BatchNorm2d(w4), nn.ReLU(inplace=True),
            nn.Conv2d(w4, out_channels, 3, padding=1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.fc(features).view(-1, self.width, self.s0, self.s0)
        x = self.net(x)[..., :self.image_size, :self.image_size]
        return torch.sigmoid(x) if self.out_activation == "sigmoid" else x


def luma(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB -> (B, 1, H, W) ITU-R 601 luma; other channel counts -> channel mean."""
    if x.shape[1] != 3:
        return x.mean(dim=1, keepdim=True)
    weights = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


def images_to_tensor(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W[, C]) -> float (N, C, H, W) in [0, 1] on the CPU (for previews)."""
    from ssl_lib.augment import nhwc_to_tensor

    return nhwc_to_tensor(np.asarray(images_uint8)).float().div_(255.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    from ssl_lib.augment import tensor_to_nhwc_uint8

    return tensor_to_nhwc_uint8(x)
