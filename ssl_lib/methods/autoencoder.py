"""Denoising autoencoder (Vincent et al., 2008): corrupt the image, reconstruct the clean one
through the encoder's pooled features."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import nn

from ssl_lib.augment import shift_flip
from ssl_lib.methods._common import FeatureDecoder, augment_option, images_to_tensor, max_shift_option, to_uint8
from ssl_lib.methods.base import MethodOptions, OptionsArg, SSLMethod, register


def denoising_loss(recon: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Pixel MSE between the reconstruction of the corrupted image and the clean image.

        loss = mean_{b, c, h, w} (g(f(corrupt(x))) - x)^2,
        corrupt(x) = clip(m * x + (1 - m) * mean(x) + sigma * eps, 0, 1),  eps ~ N(0, 1), m ~ Bernoulli(1 - p)

    f is the encoder, g the decoder, sigma ``noise_std`` and p ``drop_prob`` (per pixel).
    """
    return (recon - clean).pow(2).mean()


def corrupt(x: torch.Tensor, generator: torch.Generator, noise_std: float, drop_prob: float) -> torch.Tensor:
    """Gaussian noise plus pixel dropout (to the batch's per-channel mean), clipped to [0, 1]."""
    noise = torch.randn(x.shape, generator=generator, device=generator.device).to(x)
    keep = (torch.rand(x.shape[0], 1, *x.shape[2:], generator=generator, device=generator.device) >= drop_prob).to(x)
    fill = x.mean(dim=(0, 2, 3), keepdim=True)
    return (keep * x + (1 - keep) * fill + noise_std * noise).clamp(0, 1)


@register
class DenoisingAutoencoder(SSLMethod["DenoisingAutoencoder.Options"]):
    """Encoder -> pooled features -> light conv decoder -> clean image (sigmoid); MSE loss.

    Noise is drawn from the epoch's generator (seeded by the ``epoch_seed`` pseudo labels).
    Works with any backbone.
    """

    name = "autoencoder"
    family = "generative"

    class Options(MethodOptions):
        noise_std: float = Field(0.3, ge=0, description="std of the Gaussian noise added to the input")
        # At 1 every pixel is dropped: nothing of the image is left to encode.
        drop_prob: float = Field(0.25, ge=0, lt=1, description="per-pixel probability of dropping to the batch mean")
        decoder_width: int = Field(64, ge=1, description="channels of the conv decoder's first stage")
        augment: bool = augment_option()
        max_shift_px: int = max_shift_option(1)


    def __init__(self, encoder: nn.Module, feature_dim: int, in_channels: int, image_size: int,
                 **options: Any) -> None:
        super().__init__(encoder, feature_dim, in_channels, image_size, **options)
        self.decoder = FeatureDecoder(feature_dim, in_channels, image_size, self.options.decoder_width)

    def loss(self, images: torch.Tensor, targets: dict[str, torch.Tensor],
             generator: torch.Generator) -> torch.Tensor:
        if self.options.augment:
            images = shift_flip(images, generator, self.options.max_shift_px)
        noisy = corrupt(images, generator, self.options.noise_std, self.options.drop_prob)
        return denoising_loss(self.decoder(self.encoder(noisy)), images)

    @classmethod
    def preview_pairs(cls, images_uint8: np.ndarray, pseudo: dict[str, np.ndarray],
                      count: int, options: OptionsArg = None) -> list[tuple[np.ndarray, str]]:
        """(corrupted input, clean target) pairs, noise drawn with the first epoch's seed."""
        opts = cls.resolve_options(options)
        n = min(max(1, count // 2), len(images_uint8))
        x = images_to_tensor(images_uint8[:n])
        generator = torch.Generator().manual_seed(int(pseudo["epoch_seed"][0]))
        noisy = to_uint8(corrupt(x, generator, opts.noise_std, opts.drop_prob))
        clean = to_uint8(x)
        pairs: list[tuple[np.ndarray, str]] = []
        for i in range(n):
            pairs += [(noisy[i], f"#{i} input"), (clean[i], f"#{i} clean")]
        return pairs
