"""SimCLR (Chen et al., 2020): two augmented views of each image should embed close together."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ssl_lib.distributed import gather_with_grad
from ssl_lib.methods.base import register
from ssl_lib.methods.views import TwoViewMethod, ViewOptions, normalized_embedding_std


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


@register
class SimCLR(TwoViewMethod["SimCLR.Options"]):
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


    def __init__(self, encoder: nn.Module, feature_dim: int, in_channels: int, image_size: int,
                 **options: Any) -> None:
        super().__init__(encoder, feature_dim, in_channels, image_size, **options)
        hidden, out = self.options.proj_hidden, self.options.proj_dim
        self.projector = nn.Sequential(nn.Linear(feature_dim, hidden), nn.BatchNorm1d(hidden),
                                       nn.ReLU(inplace=True), nn.Linear(hidden, out))

    def loss(self, images: torch.Tensor, targets: dict[str, torch.Tensor],
             generator: torch.Generator) -> torch.Tensor:
        v1, v2 = self.views(images, generator)
        # One encoder pass over both views: BatchNorm sees 2B samples and the call overhead halves.
        z = self.projector(self.encoder(torch.cat([v1, v2])))
        z1, z2 = z.chunk(2)
        with torch.no_grad():
            self.last_stats = {"embedding_std": normalized_embedding_std(z1.detach())}
        # Under data parallelism the negatives are the whole global batch.
        return nt_xent_loss(gather_with_grad(z1), gather_with_grad(z2), self.options.temperature)
