"""What the two-view methods (MoCo, BYOL, SimSiam, Barlow Twins, VICReg, DINO) share with SimCLR.

The view augmentation, its options and the preview are SimCLR's, reused rather than copied: a method's
``Options`` derive from ``ViewOptions`` (SimCLR's view options with SimCLR's defaults), which maps them to
``AugmentSettings``, and the preview is SimCLR's ``preview_views``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ssl_lib.augment import augment_views
from ssl_lib.methods.base import OptionsArg, SSLMethod
from ssl_lib.methods.simclr import ViewOptions, preview_views

__all__ = ["TwoViewMethod", "ViewOptions", "mlp"]


def mlp(in_dim: int, hidden: int, out_dim: int, layers: int = 2, last_bn: bool = False) -> nn.Sequential:
    """``layers`` Linear layers, Linear-BN-ReLU between them; ``last_bn`` adds an affine-free BN at the end."""
    if layers < 1:
        raise ValueError(f"an MLP needs at least one layer, got {layers}")
    modules: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers - 1):
        modules += [nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        dim = hidden
    modules.append(nn.Linear(dim, out_dim))
    if last_bn:
        modules.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*modules)


class TwoViewMethod(SSLMethod):
    """Base of the methods that compare two random SimCLR-style views of each image (not registered).

    Subclasses derive their ``Options`` from ``ViewOptions`` and call ``self.views``.
    """

    Options = ViewOptions
    options: ViewOptions

    def __init__(self, encoder: nn.Module, feature_dim: int, in_channels: int, image_size: int,
                 **options: Any) -> None:
        super().__init__(encoder, feature_dim, in_channels, image_size, **options)
        self.augment_settings = self.options.augment_settings()

    def views(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Two independent views of the batch, drawn from ``generator`` in the same order as SimCLR's."""
        return (augment_views(images, generator, self.augment_settings),
                augment_views(images, generator, self.augment_settings))

    @classmethod
    def preview_pairs(cls, images_uint8: np.ndarray, pseudo: dict[str, np.ndarray],
                      count: int, options: OptionsArg = None) -> list[tuple[np.ndarray, str]]:
        """The two views of the first ``count // 2`` images, as drawn with the first epoch's seed."""
        opts = cls.resolve_options(options)
        assert isinstance(opts, ViewOptions)  # always true (Options is a ViewOptions); narrows the type for mypy
        return preview_views(images_uint8, pseudo, count, opts)
