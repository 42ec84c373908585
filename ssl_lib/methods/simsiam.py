"""SimSiam (Chen & He, 2021): BYOL without the momentum target; a stop-gradient prevents collapse."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ssl_lib.methods.base import register
from ssl_lib.methods.views import TwoViewMethod, ViewOptions, mlp, normalized_embedding_std


def simsiam_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Negative cosine similarity with a stop-gradient on the target side:

        loss = -1/B sum_i cos(p_i, stopgrad(z_i))

    in [-1, 1]; no gradient flows into ``z``.
    """
    if p.shape != z.shape or p.ndim != 2:
        raise ValueError(f"p and z must both be (B, D), got {tuple(p.shape)} and {tuple(z.shape)}")
    return -F.cosine_similarity(p.float(), z.detach().float(), dim=1).mean()


@register
class SimSiam(TwoViewMethod["SimSiam.Options"]):
    """SimSiam: z = projector(encoder(v)) (3 layers, BN on the output), p = predictor(z) (bottleneck).

    loss = (simsiam(p1, z2) + simsiam(p2, z1)) / 2, in [-1, 1].
    """

    name = "simsiam"
    family = "non-contrastive"

    class Options(ViewOptions):
        proj_dim: int = Field(256, ge=1, description="output size of the projection head")
        proj_hidden: int = Field(256, ge=1, description="hidden width of the projection head")
        pred_hidden: int = Field(64, ge=1, description="bottleneck width of the predictor")


    def __init__(self, encoder: nn.Module, feature_dim: int, in_channels: int, image_size: int,
                 **options: Any) -> None:
        super().__init__(encoder, feature_dim, in_channels, image_size, **options)
        hidden, out = self.options.proj_hidden, self.options.proj_dim
        self.projector = mlp(feature_dim, hidden, out, layers=3, last_bn=True)
        self.predictor = mlp(out, self.options.pred_hidden, out)

    def loss(self, images: torch.Tensor, targets: dict[str, torch.Tensor],
             generator: torch.Generator) -> torch.Tensor:
        v1, v2 = self.views(images, generator)
        z = self.projector(self.encoder(torch.cat([v1, v2])))
        p1, p2 = self.predictor(z).chunk(2)
        z1, z2 = z.chunk(2)
        with torch.no_grad():
            self.last_stats = {"embedding_std": normalized_embedding_std(z1.detach())}
        return (simsiam_loss(p1, z2) + simsiam_loss(p2, z1)) / 2
