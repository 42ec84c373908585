"""BYOL (Grill et al., 2020): an online network predicts a slowly moving target network's embedding."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ssl_lib.methods.base import register
from ssl_lib.methods.momentum import cosine_momentum, ema_update, make_target
from ssl_lib.methods.views import TwoViewMethod, ViewOptions, mlp, normalized_embedding_std


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Normalized MSE between predictions and target embeddings, averaged over the batch:

        loss = 1/B sum_i || p_i/||p_i|| - z_i/||z_i|| ||^2 = 1/B sum_i (2 - 2 cos(p_i, z_i))

    in [0, 4]. ``z`` should come detached from the target network.
    """
    if p.shape != z.shape or p.ndim != 2:
        raise ValueError(f"p and z must both be (B, D), got {tuple(p.shape)} and {tuple(z.shape)}")
    return (2 - 2 * F.cosine_similarity(p.float(), z.float(), dim=1)).mean()


@register
class BYOL(TwoViewMethod["BYOL.Options"]):
    """BYOL: online = predictor(projector(encoder)), target = EMA of projector(encoder).

    The projector ends in an affine-free BN unless ``proj_last_bn`` is false (the paper's head).

    loss = (byol(q(g(f(v1))), g'(f'(v2))) + byol(q(g(f(v2))), g'(f'(v1)))) / 2; the target's
    momentum rises from ``momentum`` to 1 on a cosine over the run.
    """

    name = "byol"
    family = "non-contrastive"

    class Options(ViewOptions):
        proj_dim: int = Field(128, ge=1, description="output size of the projection head")
        proj_hidden: int = Field(512, ge=1, description="hidden width of the projection head")
        pred_hidden: int = Field(512, ge=1, description="hidden width of the predictor")
        # The schedule rises from here to 1; at 1 the target would stay at its random init.
        momentum: float = Field(0.99, ge=0, lt=1, description="starting EMA momentum of the target (cosine to 1)")
        # An affine-free BN on the projection, as SimSiam has (the BYOL paper has none). Without it, short
        # runs on small data (tests/test_methods_joint.py) learn backbone features worse than random init.
        proj_last_bn: bool = Field(True, description="affine-free BatchNorm after the projection (false: the paper's)")


    def __init__(self, encoder: nn.Module, feature_dim: int, in_channels: int, image_size: int,
                 **options: Any) -> None:
        super().__init__(encoder, feature_dim, in_channels, image_size, **options)
        hidden, out = self.options.proj_hidden, self.options.proj_dim
        self.projector = mlp(feature_dim, hidden, out, last_bn=self.options.proj_last_bn)
        self.predictor = mlp(out, self.options.pred_hidden, out)
        self.target_encoder = make_target(self.encoder)
        self.target_projector = make_target(self.projector)

    def loss(self, images: torch.Tensor, targets: dict[str, torch.Tensor],
             generator: torch.Generator) -> torch.Tensor:
        v1, v2 = self.views(images, generator)
        both = torch.cat([v1, v2])
        z = self.projector(self.encoder(both))
        p1, p2 = self.predictor(z).chunk(2)
        with torch.no_grad():
            t1, t2 = self.target_projector(self.target_encoder(both)).chunk(2)
        loss = (byol_loss(p1, t2) + byol_loss(p2, t1)) / 2
        with torch.no_grad():
            self.last_stats = {"embedding_std": normalized_embedding_std(z.chunk(2)[0].detach())}
        return loss

    def after_step(self, step: int, total_steps: int) -> None:
        m = cosine_momentum(self.options.momentum, step, total_steps)
        ema_update(self.target_encoder, self.encoder, m)
        ema_update(self.target_projector, self.projector, m)
