"""Barlow Twins (Zbontar et al., 2021): make the cross-correlation of two views' embeddings the identity."""
from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from ssl_lib.distributed import gather_with_grad
from ssl_lib.methods.base import register
from ssl_lib.methods.views import TwoViewMethod, ViewOptions, mlp, normalized_embedding_std


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float, eps: float = 1e-5) -> torch.Tensor:
    """Redundancy-reduction loss of B embedding pairs (B, D).

    Each dimension is standardized over the batch, a = (z - mean_b z) / sqrt(var_b z + eps) with the
    biased batch variance (as the paper's affine-free BatchNorm), and with the cross-correlation
    C_ij = 1/B sum_b a1_bi a2_bj:

        loss = sum_i (1 - C_ii)^2 + lambd * sum_i sum_{j != i} C_ij^2

    The first term makes the views agree, the second decorrelates the dimensions.
    """
    if z1.shape != z2.shape or z1.ndim != 2 or z1.shape[0] < 2:
        raise ValueError(f"z1 and z2 must both be (B, D) with B >= 2, got {tuple(z1.shape)} and {tuple(z2.shape)}")

    def standardize(z: torch.Tensor) -> torch.Tensor:
        z = z.float()
        return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + eps)

    c = standardize(z1).t() @ standardize(z2) / z1.shape[0]
    diag = torch.diagonal(c)
    on_diag = (1 - diag).pow(2).sum()
    off_diag = c.pow(2).sum() - diag.pow(2).sum()
    return on_diag + lambd * off_diag


@register
class BarlowTwins(TwoViewMethod["BarlowTwins.Options"]):
    """Barlow Twins: z = projector(encoder(v)) (3-layer expander), loss = barlow_twins(z1, z2, lambd).

    ``lambd`` about 1/proj_dim balances the D on-diagonal against the D^2 - D off-diagonal terms.
    """

    name = "barlow_twins"
    family = "non-contrastive"

    class Options(ViewOptions):
        proj_dim: int = Field(256, ge=1, description="output size of the 3-layer expander")
        proj_hidden: int = Field(256, ge=1, description="hidden width of the expander")
        # 0 leaves only the invariance term: allowed, if collapse-prone.
        lambd: float = Field(0.0051, ge=0, description="weight of the off-diagonal (redundancy) terms, ~1/proj_dim")


    def __init__(self, encoder: nn.Module, feature_dim: int, in_channels: int, image_size: int,
                 **options: Any) -> None:
        super().__init__(encoder, feature_dim, in_channels, image_size, **options)
        self.projector = mlp(feature_dim, self.options.proj_hidden, self.options.proj_dim, layers=3)

    def loss(self, images: torch.Tensor, targets: dict[str, torch.Tensor],
             generator: torch.Generator) -> torch.Tensor:
        v1, v2 = self.views(images, generator)
        # One encoder pass over both views; the loss standardizes each view's batch on its own.
        z1, z2 = self.projector(self.encoder(torch.cat([v1, v2]))).chunk(2)
        with torch.no_grad():
            self.last_stats = {"embedding_std": normalized_embedding_std(z1.detach())}
        # The cross-correlation is over the global batch under data parallelism.
        return barlow_twins_loss(gather_with_grad(z1), gather_with_grad(z2), self.options.lambd)
