"""Context encoder (Pathak et al., 2016): blank out a square patch and paint it back in from the
encoder's features of the rest of the image."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import nn

from ssl_lib.augment import shift_flip
from ssl_lib.methods._common import (
    FeatureDecoder,
    augment_option,
    images_to_tensor,
    max_shift_option,
    sample_seeds,
    square_mask,
    to_uint8,
)
from ssl_lib.methods.base import MethodOptions, OptionsArg, SSLMethod, register


def inpainting_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                    context_weight: float = 0.0) -> torch.Tensor:
    """Masked L2 reconstruction (context-encoder style).

        loss = sum(M * (x_hat - x)^2) / sum(M * 1_C) + w * sum((1 - M) * (x_hat - x)^2) / sum((1 - M) * 1_C)

    M is 1 on the blanked square (broadcast over the C channels), x_hat the decoder output, w the
    optional ``context_weight`` on the visible region (0: only the hole counts).
    """
    sq = (pred - target).pow(2)
    channels = target.shape[1]
    hole = (sq * mask).sum() / (mask.sum() * channels).clamp_min(1.0)
    if context_weight <= 0:
        return hole
    visible = 1.0 - mask
    return hole + context_weight * (sq * visible).sum() / (visible.sum() * channels).clamp_min(1.0)


@register
class Inpainting(SSLMethod["Inpainting.Options"]):
    """Mask one ``mask_fraction``-sided square per image (filled with the batch's per-channel mean),
    encode, and decode the whole image with a light conv decoder; L2 on the masked pixels.

    The square's position is fixed per sample and epoch by the ``mask_seed`` pseudo labels.
    Works with any backbone: the decoder starts from the pooled (B, D) features.
    """

    name = "inpainting"
    family = "pretext"

    class Options(MethodOptions):
        # At 1 the square covers the whole image: no context is left to paint from.
        mask_fraction: float = Field(0.5, gt=0, lt=1, description="side of the blanked square / the image side")
        decoder_width: int = Field(64, ge=1, description="channels of the conv decoder's first stage")
        context_weight: float = Field(0.0, ge=0, description="loss weight of the visible pixels (0: the hole only)")
        augment: bool = augment_option()
        max_shift_px: int = max_shift_option(1)


    def __init__(self, encoder: nn.Module, feature_dim: int, in_channels: int, image_size: int,
                 **options: Any) -> None:
        super().__init__(encoder, feature_dim, in_channels, image_size, **options)
        self.mask_size = self.mask_side(image_size, self.options.mask_fraction)
        self.decoder = FeatureDecoder(feature_dim, in_channels, image_size, self.options.decoder_width)

    @staticmethod
    def mask_side(image_size: int, mask_fraction: float) -> int:
        return max(1, round(image_size * mask_fraction))

    def masked_input(self, images: torch.Tensor, seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = images.shape[-2:]
        mask = square_mask(seeds, h, w, self.mask_size).to(images)
        fill = images.mean(dim=(0, 2, 3), keepdim=True).detach()
        return images * (1 - mask) + fill * mask, mask

    def loss(self, images: torch.Tensor, targets: dict[str, torch.Tensor],
             generator: torch.Generator) -> torch.Tensor:
        if self.options.augment:
            images = shift_flip(images, generator, self.options.max_shift_px)
        masked, mask = self.masked_input(images, targets["mask_seed"])
        pred = self.decoder(self.encoder(masked))
        return inpainting_loss(pred, images, mask, self.options.context_weight)

    @classmethod
    def make_pseudo_labels(cls, num_images: int, epochs: int, seed: int) -> dict[str, np.ndarray]:
        """Adds ``mask_seed``: (epochs, N) int64, the seed that places each sample's square."""
        pseudo = super().make_pseudo_labels(num_images, epochs, seed)
        pseudo["mask_seed"] = sample_seeds(seed, 0x1A7, epochs, num_images)
        return pseudo

    @classmethod
    def preview_pairs(cls, images_uint8: np.ndarray, pseudo: dict[str, np.ndarray],
                      count: int, options: OptionsArg = None) -> list[tuple[np.ndarray, str]]:
        """(masked input, target) pairs for the first ``count // 2`` images of the first epoch."""
        opts = cls.resolve_options(options)
        n = min(max(1, count // 2), len(images_uint8))
        x = images_to_tensor(images_uint8[:n])
        side = cls.mask_side(x.shape[-1], opts.mask_fraction)
        mask = square_mask(torch.as_tensor(pseudo["mask_seed"][0, :n]), x.shape[-2], x.shape[-1], side)
        masked = to_uint8(x * (1 - mask) + x.mean(dim=(0, 2, 3), keepdim=True) * mask)
        target = to_uint8(x)
        pairs: list[tuple[np.ndarray, str]] = []
        for i in range(n):
            pairs += [(masked[i], f"#{i} input"), (target[i], f"#{i} fill in")]
        return pairs
