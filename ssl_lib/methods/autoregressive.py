"""Autoregressive patch prediction (iGPT, Chen et al., 2020; AIM, El-Nouby et al., 2024): with a
causal attention mask the ViT predicts each patch's pixels from the patches before it (raster order)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import nn

from ssl_lib.augment import shift_flip
from ssl_lib.errors import MethodRequirementError
from ssl_lib.methods._common import (
    augment_option,
    images_to_tensor,
    max_shift_option,
    per_sample_uniform,
    require_vit,
    sample_seeds,
    to_uint8,
    weighted_patch_mse,
)
from ssl_lib.methods.base import MethodOptions, OptionsArg, SSLMethod, register
from ssl_lib.methods.mae import patchify, unpatchify
from ssl_lib.models.vit import default_patch_size


def prefix_lengths(seeds: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(B,) prefix length K in [1, L - 1] per sample, fixed by its seed."""
    u = per_sample_uniform(seeds, 1)[:, 0]
    return 1 + (u * (num_patches - 1)).long().clamp(max=num_patches - 2)


def prefix_causal_mask(prefix: torch.Tensor, length: int) -> torch.Tensor:
    """(B, 1, T, T) bool attention mask, True = may attend: causal, except that the first
    ``prefix[b] + 1`` positions (start token + K patches) see each other bidirectionally.

        allowed[b, i, j] = (j <= i) or (j <= prefix[b])
    """
    i = torch.arange(length, device=prefix.device)
    causal = i[None, :] <= i[:, None]
    return (causal[None] | (i[None, None, :] <= prefix[:, None, None]))[:, None]


def next_patch_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                    norm_pix: bool = True) -> torch.Tensor:
    """Next-patch pixel regression.

        loss = sum_{b, l} w_{b,l} * mean_j (x_hat_{b,l,j} - t_{b,l,j})^2 / sum_{b, l} w_{b,l}

    x_hat_{b,l} is predicted from the start token and patches < l only (causal mask);
    t is patch l's pixels, per-patch normalized when ``norm_pix`` (as in MAE/AIM); w_{b,l} = 1 for
    patches after sample b's bidirectional prefix (all patches without a prefix).
    """
    return weighted_patch_mse(pred, target, weight, norm_pix)


@register
class AutoregressivePatches(SSLMethod["AutoregressivePatches.Options"]):
    """Next-patch prediction on ``vit_tiny`` (other backbones raise MethodRequirementError at construction).

    The sequence is [start (the class token), patch 0, ..., patch L-2]; the output at position l
    predicts patch l through an MLP head. With ``prefix_causal`` (AIM) the first K patches
    (K per sample and epoch from the ``prefix_seed`` pseudo labels) attend bidirectionally and are
    not scored, so the encoder also works with the full bidirectional attention it gets downstream.
    """

    name = "autoregressive"
    family = "generative"
    required_backbone = "vit_tiny"

    class Options(MethodOptions):
        prefix_causal: bool = Field(True, description="AIM's prefix: the first K patches attend both ways, unscored")
        head_hidden: int = Field(256, ge=1, description="hidden width of the pixel-prediction head")
        norm_pix_loss: bool = Field(True, description="regress per-patch standardized pixels, as in MAE")
        augment: bool = augment_option()
        max_shift_px: int = max_shift_option(1)


    def __init__(self, encoder: nn.Module, feature_dim: int, in_channels: int, image_size: int,
                 **options: Any) -> None:
        super().__init__(encoder, feature_dim, in_channels, image_size, **options)
        _, vit = require_vit(encoder, self.name)
        if vit.num_patches < 3:
            raise MethodRequirementError(f"autoregressive needs at least 3 patches, the vit has {vit.num_patches}")
        hidden, out = self.options.head_hidden, vit.patch_size ** 2 * in_channels
        self.head = nn.Sequential(nn.Linear(vit.dim, hidden), nn.GELU(), nn.Linear(hidden, out))

    def loss(self, images: torch.Tensor, targets: dict[str, torch.Tensor],
             generator: torch.Generator) -> torch.Tensor:
        normalize, vit = require_vit(self.encoder, self.name)
        if self.options.augment:
            images = shift_flip(images, generator, self.options.max_shift_px)
        imgs = normalize(images).contiguous()
        b, length = imgs.shape[0], vit.num_patches
        seq = vit.with_cls(vit.embed(imgs))[:, :length]  # drop the last patch: nothing left to predict
        if self.options.prefix_causal:
            prefix = prefix_lengths(targets["prefix_seed"], length).to(imgs.device)
            out = vit.run_blocks(seq, attn_mask=prefix_causal_mask(prefix, length))
            weight = (torch.arange(length, device=imgs.device)[None, :] >= prefix[:, None]).float()
        else:
            out = vit.run_blocks(seq, causal=True)
            weight = torch.ones(b, length, device=imgs.device)
        pred = self.head(out)
        return next_patch_loss(pred, patchify(imgs, vit.patch_size), weight, self.options.norm_pix_loss)

    @classmethod
    def make_pseudo_labels(cls, num_images: int, epochs: int, seed: int) -> dict[str, np.ndarray]:
        """Adds ``prefix_seed``: (epochs, N) int64, the seed of each sample's prefix length."""
        pseudo = super().make_pseudo_labels(num_images, epochs, seed)
        pseudo["prefix_seed"] = sample_seeds(seed, 0xA17, epochs, num_images)
        return pseudo

    @classmethod
    def preview_pairs(cls, images_uint8: np.ndarray, pseudo: dict[str, np.ndarray],
                      count: int, options: OptionsArg = None) -> list[tuple[np.ndarray, str]]:
        """(prefix the model sees, full image) pairs: with prefix_causal, the K-patch prefix of the first
        epoch; patches after it (gray) are predicted one at a time, each from all patches before it."""
        opts = cls.resolve_options(options)
        n = min(max(1, count // 2), len(images_uint8))
        x = images_to_tensor(images_uint8[:n])
        p = default_patch_size(x.shape[-1])
        patches = patchify(x, p)
        length = patches.shape[1]
        if opts.prefix_causal:
            prefix = prefix_lengths(torch.as_tensor(pseudo["prefix_seed"][0, :n]), length)
        else:
            prefix = torch.ones(n, dtype=torch.long)
        hidden = torch.arange(length)[None, :] >= prefix[:, None]
        shown = to_uint8(unpatchify(torch.where(hidden[..., None], torch.full_like(patches, 0.5), patches),
                                    p, x.shape[1]))
        full = to_uint8(x)
        pairs: list[tuple[np.ndarray, str]] = []
        for i in range(n):
            pairs += [(shown[i], f"#{i} prefix {int(prefix[i])}/{length}"), (full[i], f"#{i} next patches")]
        return pairs
