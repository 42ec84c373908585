"""What the two-view methods (SimCLR, MoCo, BYOL, SimSiam, Barlow Twins, VICReg, DINO) share.

The view augmentation, its options (SimCLR's, with SimCLR's defaults) and its preview, the collapse monitor and
the MLP heads. A method's ``Options`` derive from ``ViewOptions``, which maps them to ``AugmentSettings``. This
module imports no concrete method: they all import it.
"""
from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ssl_lib.augment import AugmentSettings, augment_views, nhwc_to_tensor, tensor_to_nhwc_uint8
from ssl_lib.methods.base import MethodOptions, OptionsArg, SSLMethod

__all__ = ["TwoViewMethod", "ViewOptions", "mlp", "normalized_embedding_std", "preview_views"]


def normalized_embedding_std(z: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the per-dimension std of L2-normalized embeddings.

    About 1/sqrt(D) when embeddings spread over the sphere, near 0 when they collapse to a point.
    """
    return F.normalize(z.float(), dim=1).std(dim=0).mean()


class ViewOptions(MethodOptions):
    """The view augmentation's options: SimCLR's, shared by every two-view method."""

    crop_scale_min: float = Field(0.25, gt=0, le=1, description="smallest area fraction of the random resized crop")
    jitter_p: float = Field(0.8, ge=0, le=1, description="probability of colour jitter, per view")
    # Factors are drawn from [1 - s, 1 + s]: above 1 a factor could turn negative.
    jitter_strength: float = Field(0.4, ge=0, le=1,
                                   description="jitter of brightness, contrast and saturation: factors in [1-s, 1+s]")
    grayscale_p: float = Field(0.2, ge=0, le=1, description="probability of grayscale, per view (RGB data only)")
    blur_p: float = Field(0.0, ge=0, le=1, description="probability of Gaussian blur, per view")
    solarize_p: float = Field(0.0, ge=0, le=1, description="probability of solarization, per view")

    def augment_settings(self) -> AugmentSettings:
        strength = self.jitter_strength
        return AugmentSettings(crop_scale=(self.crop_scale_min, 1.0), jitter_p=self.jitter_p, brightness=strength,
                               contrast=strength, saturation=strength, grayscale_p=self.grayscale_p,
                               blur_p=self.blur_p, solarize_p=self.solarize_p)


def preview_views(images_uint8: np.ndarray, pseudo: dict[str, np.ndarray], count: int,
                  options: ViewOptions) -> list[tuple[np.ndarray, str]]:
    """The two views of the first ``count // 2`` images, as drawn with the first epoch's seed."""
    settings = options.augment_settings()
    n = min(max(1, count // 2), len(images_uint8))
    generator = torch.Generator().manual_seed(int(pseudo["epoch_seed"][0]))
    batch = nhwc_to_tensor(images_uint8[:n])
    v1 = tensor_to_nhwc_uint8(augment_views(batch, generator, settings))
    v2 = tensor_to_nhwc_uint8(augment_views(batch, generator, settings))
    pairs: list[tuple[np.ndarray, str]] = []
    for i in range(n):
        pairs += [(v1[i], f"#{i} view 1"), (v2[i], f"#{i} view 2")]
    return pairs


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


ViewOptionsT = TypeVar("ViewOptionsT", bound=ViewOptions)


class TwoViewMethod(SSLMethod[ViewOptionsT]):
    """Base of the methods that compare two random SimCLR-style views of each image (not registered).

    Subclasses derive their ``Options`` from ``ViewOptions``, are generic in them like any method
    (``class MoCo(TwoViewMethod["MoCo.Options"])``), and call ``self.views``.
    """

    Options = ViewOptions

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
        return preview_views(images_uint8, pseudo, count, cls.resolve_options(options))
