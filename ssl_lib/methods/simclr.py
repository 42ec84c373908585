"""SimCLR (Chen et al., 2020): two augmented views of each image should embed close together."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ssl_lib.augment import AugmentSettings, augment_views, nhwc_to_tensor, tensor_to_nhwc_uint8
from ssl_lib.distributed import gather_with_grad
from ssl_lib.methods.base import MethodOptions, OptionsArg, SSLMethod, register


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Normalized-temperature cross entropy over the 2B embeddings of B positive pairs.

    With u_i = z_i / ||z_i|| for the 2B embeddings, sim(i, j) = u_i . u_j and p(i) the index of
    the other view of the same image:

        loss = 1/(2B) sum_i -log( exp(sim(i, p(i)) / t) / sum_{j != i} exp(sim(i, j) / t) )

    i.e. a (2B - 1)-way classification of the positive among all other embeddings in the batch.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1 and z2 must both be (B, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    b = z1.shape[0]
    u = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = u @ u.t() / temperature
    # An embedding is trivially most similar to itself; take it out of the denominator.
    logits.fill_diagonal_(float("-inf"))
    positives = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(u.device)
    return F.cross_entropy(logits, positives)


def normalized_embedding_std(z: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the per-dimension std of L2-normalized embeddings.

    About 1/sqrt(D) when embeddings spread over the sphere, near 0 when they collapse to a point.
    """
    return F.normalize(z.float(), dim=1).std(dim=0).mean()


class ViewOptions(MethodOptions):
    """The view augmentation's options: SimCLR's, shared by every two-view method (``ssl_lib.methods.views``)."""

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


@register
class SimCLR(SSLMethod):
    """Contrastive learning of two random views per image, NT-Xent on a projection MLP.

    loss = nt_xent(g(f(aug1(x))), g(f(aug2(x))), temperature); f is the encoder, g the projection
    head that is thrown away after pretraining.
    """

    name = "simclr"
    family = "contrastive"

    class Options(ViewOptions):
        temperature: float = Field(0.2, gt=0, description="softmax temperature of NT-Xent")
        proj_dim: int = Field(128, ge=1, description="output size of the projection head")
        proj_hidden: int = Field(512, ge=1, description="hidden width of the projection head")

    options: Options

    def __init__(self, encoder: nn.Module, feature_dim: int, in_channels: int, image_size: int,
                 **options: Any) -> None:
        super().__init__(encoder, feature_dim, in_channels, image_size, **options)
        hidden, out = self.options.proj_hidden, self.options.proj_dim
        self.projector = nn.Sequential(nn.Linear(feature_dim, hidden), nn.BatchNorm1d(hidden),
                                       nn.ReLU(inplace=True), nn.Linear(hidden, out))
        self.augment_settings = self.options.augment_settings()

    def loss(self, images: torch.Tensor, targets: dict[str, torch.Tensor],
             generator: torch.Generator) -> torch.Tensor:
        v1 = augment_views(images, generator, self.augment_settings)
        v2 = augment_views(images, generator, self.augment_settings)
        # One encoder pass over both views: BatchNorm sees 2B samples and the call overhead halves.
        z = self.projector(self.encoder(torch.cat([v1, v2])))
        z1, z2 = z.chunk(2)
        with torch.no_grad():
            self.last_stats = {"embedding_std": normalized_embedding_std(z1.detach())}
        # Under data parallelism the negatives are the whole global batch.
        return nt_xent_loss(gather_with_grad(z1), gather_with_grad(z2), self.options.temperature)

    @classmethod
    def preview_pairs(cls, images_uint8: np.ndarray, pseudo: dict[str, np.ndarray],
                      count: int, options: OptionsArg = None) -> list[tuple[np.ndarray, str]]:
        """The two views of the first ``count // 2`` images, as drawn with the first epoch's seed."""
        opts = cls.resolve_options(options)
        assert isinstance(opts, ViewOptions)  # always true (Options is a ViewOptions); narrows the type for mypy
        return preview_views(images_uint8, pseudo, count, opts)
