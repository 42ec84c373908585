"""Colorization (Zhang et al., 2016; Larsson et al., 2016): predict an image's colours from its
grayscale version. RGB data only."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import nn

from ssl_lib.augment import shift_flip
from ssl_lib.errors import MethodRequirementError
from ssl_lib.methods._common import FeatureDecoder, augment_option, images_to_tensor, luma, max_shift_option, to_uint8
from ssl_lib.methods.base import MethodOptions, OptionsArg, SSLMethod, register


def colorization_loss(pred_chroma: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """L2 on the chroma (colour minus luma) of every pixel.

        loss = mean_{b, c, h, w} (c_hat - (x - Y(x)))^2,   Y(x) = 0.299 R + 0.587 G + 0.114 B

    The network sees only Y(x) (replicated to 3 channels) and predicts c_hat, so x_hat = Y(x) + c_hat.
    """
    return (pred_chroma - (images - luma(images))).pow(2).mean()


@register
class Colorization(SSLMethod["Colorization.Options"]):
    """Gray (luma replicated to RGB) in, per-pixel chroma out through a light conv decoder on the
    pooled features; L2 loss. Needs 3-channel data: a ``folder`` source of colour images or other
    CIFAR-like RGB data; grayscale sources (digits, fashion-mnist) raise MethodRequirementError.
    """

    name = "colorization"
    family = "pretext"
    required_channels = 3  # check_data raises the message

    class Options(MethodOptions):
        decoder_width: int = Field(64, ge=1, description="channels of the conv decoder's first stage")
        augment: bool = augment_option()
        max_shift_px: int = max_shift_option(2)


    def __init__(self, encoder: nn.Module, feature_dim: int, in_channels: int, image_size: int,
                 **options: Any) -> None:
        self.check_data(in_channels)
        super().__init__(encoder, feature_dim, in_channels, image_size, **options)
        self.decoder = FeatureDecoder(feature_dim, 3, image_size, self.options.decoder_width,
                                      out_activation="none")

    @classmethod
    def check_data(cls, in_channels: int, image_size: int | None = None) -> None:
        """MethodRequirementError unless the images are RGB; callable without a model."""
        super().check_data(in_channels, image_size)
        if in_channels != cls.required_channels:
            raise MethodRequirementError(
                f"method colorization needs 3-channel (RGB) colour images, got {in_channels} channel(s): "
                "use it with a 'folder' source of colour images or other CIFAR-like RGB data; "
                "grayscale sources such as digits, fashion-mnist or MNIST have no colour to predict")

    def loss(self, images: torch.Tensor, targets: dict[str, torch.Tensor],
             generator: torch.Generator) -> torch.Tensor:
        if self.options.augment:
            images = shift_flip(images, generator, self.options.max_shift_px)
        gray = luma(images).expand(-1, 3, -1, -1)
        pred = self.decoder(self.encoder(gray))
        return colorization_loss(pred, images)

    @classmethod
    def preview_pairs(cls, images_uint8: np.ndarray, pseudo: dict[str, np.ndarray],
                      count: int, options: OptionsArg = None) -> list[tuple[np.ndarray, str]]:
        """(grayscale input, colour target) pairs for the first ``count // 2`` images."""
        n = min(max(1, count // 2), len(images_uint8))
        x = images_to_tensor(images_uint8[:n])
        gray = to_uint8(luma(x).expand(-1, x.shape[1], -1, -1).contiguous())
        target = to_uint8(x)
        pairs: list[tuple[np.ndarray, str]] = []
        for i in range(n):
            pairs += [(gray[i], f"#{i} input"), (target[i], f"#{i} colour")]
        return pairs
