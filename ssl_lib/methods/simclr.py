"""SimCLR (Chen et al., 2020): two augmented views of each image should embed close together."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ssl_lib.augment import AugmentSettings, augment_views, nhwc_to_tensor, tensor_to_nhwc_uint8
from ssl_lib.distributed import gather_with_grad
from ssl_lib.methods.base import SSLMethod, register


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


@register
class SimCLR(SSLMethod):
    """Contrastive learning of two random views per image, NT-Xent on a projection MLP.

    loss = nt_xent(g(f(aug1(x))), g(f(aug2(x))), temperature); f is the encoder, g the projection
    head that is thrown away after pretraining.
    """

    name = "simclr"
    family = "contrastive"
    default_options: dict[str, Any] = {
        "temperature": 0.2,
        "proj_dim": 128,
        "proj_hidden": 512,
        "crop_scale_min": 0.25,
        "jitter_p": 0.8,
        "jitter_strength": 0.4,
        "grayscale_p": 0.2,
        "blur_p": 0.0,
        "solarize_p": 0.0,
    }

    def __init__(self, encoder: nn.Module, feature_dim: int, in_channels: int, image_size: int,
                 **options: Any) -> None:
        super().__init__(encoder, feature_dim, in_channels, image_size, **options)
        hidden, out = int(self.options["proj_hidden"]), int(self.options["proj_dim"])
        self.projector = nn.Sequential(nn.Linear(feature_dim, hidden), nn.BatchNorm1d(hidden),
                                       nn.ReLU(inplace=True), nn.Linear(hidden, out))
        self.augment_settings = self.augment_settings_from(self.options)

    @staticmethod
    def augment_settings_from(options: dict[str, Any]) -> AugmentSettings:
        strength = float(options["jitter_strength"])
        return AugmentSettings(crop_scale=(float(options["crop_scale_min"]), 1.0),
                               jitter_p=float(options["jitter_p"]), brightness=strength, contrast=strength,
                               saturation=strength, grayscale_p=float(options["grayscale_p"]),
                               blur_p=float(options["blur_p"]), solarize_p=float(options["solarize_p"]))

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
        return nt_xent_loss(gather_with_grad(z1), gather_with_grad(z2), float(self.options["temperature"]))

    @classmethod
    def preview_pairs(cls, images_uint8: np.ndarray, pseudo: dict[str, np.ndarray],
                      count: int, options: dict[str, Any] | None = None) -> list[tuple[np.ndarray, str]]:
        """The two views of the first ``count // 2`` images, as drawn with the first epoch's seed."""
        settings = cls.augment_settings_from(cls.resolve_options(options))
        n = min(max(1, count // 2), len(images_uint8))
        generator = torch.Generator().manual_seed(int(pseudo["epoch_seed"][0]))
        batch = nhwc_to_tensor(images_uint8[:n])
        v1 = tensor_to_nhwc_uint8(augment_views(batch, generator, settings))
        v2 = tensor_to_nhwc_uint8(augment_views(batch, generator, settings))
        pairs: list[tuple[np.ndarray, str]] = []
        for i in range(n):
            pairs += [(v1[i], f"#{i} view 1"), (v2[i], f"#{i} view 2")]
        return pairs
