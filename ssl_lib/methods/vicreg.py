"""VICReg (Bardes et al., 2022): invariance between views, variance and decorrelation within each view."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ssl_lib.distributed import gather_with_grad
from ssl_lib.methods.base import register
from ssl_lib.methods.views import TwoViewMethod, ViewOptions, mlp, normalized_embedding_std


def vicreg_terms(z1: torch.Tensor, z2: torch.Tensor, eps: float = 1e-4) -> dict[str, torch.Tensor]:
    """The three unweighted VICReg terms of B embedding pairs (B, D); see ``vicreg_loss``."""
    if z1.shape != z2.shape or z1.ndim != 2 or z1.shape[0] < 2:
        raise ValueError(f"z1 and z2 must both be (B, D) with B >= 2, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    z1, z2 = z1.float(), z2.float()
    b, d = z1.shape
    invariance = F.mse_loss(z1, z2)
    variance = z1.new_zeros(())
    covariance = z1.new_zeros(())
    for z in (z1, z2):
        z = z - z.mean(0)
        std = torch.sqrt(z.var(0) + eps)
        variance = variance + F.relu(1 - std).mean() / 2
        cov = z.t() @ z / (b - 1)
        covariance = covariance + (cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()) / d
    return {"invariance": invariance, "variance": variance, "covariance": covariance}


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, sim_w: float, var_w: float, cov_w: float,
                eps: float = 1e-4) -> torch.Tensor:
    """VICReg loss of B embedding pairs (B, D):

        loss = sim_w * 1/(B D) sum_b ||z1_b - z2_b||^2
             + var_w * sum_{z in z1, z2} 1/2 * 1/D sum_j max(0, 1 - sqrt(Var_b(z_j) + eps))
             + cov_w * sum_{z in z1, z2} 1/D sum_{i != j} Cov_b(z)_ij^2

    with the unbiased batch variance and covariance (divided by B - 1), as in the paper.
    """
    terms = vicreg_terms(z1, z2, eps)
    return sim_w * terms["invariance"] + var_w * terms["variance"] + cov_w * terms["covariance"]


@register
class VICReg(TwoViewMethod["VICReg.Options"]):
    """VICReg: z = projector(encoder(v)) (3-layer expander), loss = vicreg(z1, z2, 25, 25, 1)."""

    name = "vicreg"
    family = "non-contrastive"

    class Options(ViewOptions):
        proj_dim: int = Field(256, ge=1, description="output size of the 3-layer expander")
        proj_hidden: int = Field(256, ge=1, description="hidden width of the expander")
        sim_weight: float = Field(25.0, ge=0, description="weight of the invariance (view MSE) term")
        var_weight: float = Field(25.0, ge=0, description="weight of the variance (std hinge) term")
        cov_weight: float = Field(1.0, ge=0, description="weight of the covariance (decorrelation) term")


    def __init__(self, encoder: nn.Module, feature_dim: int, in_channels: int, image_size: int,
                 **options: Any) -> None:
        super().__init__(encoder, feature_dim, in_channels, image_size, **options)
        self.projector = mlp(feature_dim, self.options.proj_hidden, self.options.proj_dim, layers=3)

    def loss(self, images: torch.Tensor, targets: dict[str, torch.Tensor],
             generator: torch.Generator) -> torch.Tensor:
        v1, v2 = self.views(images, generator)
        z1, z2 = self.projector(self.encoder(torch.cat([v1, v2]))).chunk(2)
        # Variance and covariance are over the global batch under data parallelism.
        terms = vicreg_terms(gather_with_grad(z1), gather_with_grad(z2))
        o = self.options
        loss = (o.sim_weight * terms["invariance"] + o.var_weight * terms["variance"]
                + o.cov_weight * terms["covariance"])
        with torch.no_grad():
            self.last_stats = {"embedding_std": normalized_embedding_std(z1.detach()),
                               **{k: v.detach() for k, v in terms.items()}}
        return loss
