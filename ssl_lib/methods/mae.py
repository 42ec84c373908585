"""Masked autoencoder (He et al., 2022), after MAE's models_mae.py: encode a random 25 % of the
patches with the ViT, reconstruct the pixels of the others with a small transformer decoder."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from ssl_lib.augment import shift_flip
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
from ssl_lib.models.vit import Block, sincos_pos_embed


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), patches in raster order, each flattened as (p, p, C)."""
    b, c, h, w = imgs.shape
    if h % p or w % p:
        raise ValueError(f"image {h}x{w} does not split into {p}x{p} patches")
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, p: int, channels: int, grid_h: int | None = None) -> torch.Tensor:
    """(B, L, p*p*C) -> (B, C, H, W); square grid unless ``grid_h`` is given. Inverse of patchify."""
    b, length, _ = x.shape
    h = grid_h or round(length ** 0.5)
    w = length // h
    if h * w != length:
        raise ValueError(f"{length} patches do not form a {h}-row grid")
    x = x.reshape(b, h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, channels, h * p, w * p)


def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of ``noise`` (B, L): the lowest-noise patches stay.

    Returns ``(x_kept (B, L_keep, D), mask (B, L) with 0 kept / 1 removed, ids_restore (B, L),
    ids_keep (B, L_keep))`` as in models_mae.py.
    """
    b, length, d = x.shape
    len_keep = max(1, int(length * (1 - mask_ratio)))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_kept = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, d))
    mask = torch.ones(b, length, device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_kept, mask, ids_restore, ids_keep


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True) -> torch.Tensor:
    """Mean squared error on the removed patches, optionally of per-patch normalized pixels.

        t_l = (x_l - mean(x_l)) / sqrt(var(x_l) + 1e-6)   (norm_pix; else t_l = x_l)
        loss = sum_l m_l * mean_j (x_hat_{l,j} - t_{l,j})^2 / sum_l m_l

    x_l is patch l's flattened pixels, m_l = 1 for removed patches.
    """
    return weighted_patch_mse(pred, target, mask, norm_pix)


@register
class MAE(SSLMethod["MAE.Options"]):
    """Masked autoencoder on ``vit_tiny``; any other backbone raises MethodRequirementError at construction.

    loss = mae_loss(dec(enc(visible patches), mask tokens), patchify(x), mask). Which patches are
    hidden is fixed per sample and epoch by the ``mask_seed`` pseudo labels.
    """

    name = "mae"
    family = "generative"
    required_backbone = "vit_tiny"

    class Options(MethodOptions):
        # random_masking keeps at least one patch, but at 0 nothing would be left to reconstruct.
        mask_ratio: float = Field(0.75, gt=0, lt=1, description="fraction of the patches hidden from the encoder")
        # The decoder's sin-cos position embedding splits its width in four.
        decoder_dim: int = Field(64, ge=4, multiple_of=4, description="width of the transformer decoder")
        # Without a block the mask tokens never see the encoded patches, and the encoder gets no gradient.
        decoder_depth: int = Field(2, ge=1, description="transformer blocks in the decoder")
        decoder_heads: int = Field(4, ge=1, description="attention heads per decoder block; divides decoder_dim")
        norm_pix_loss: bool = Field(True, description="regress per-patch standardized pixels, as in MAE")
        augment: bool = augment_option()
        max_shift_px: int = max_shift_option(1)

        @field_validator("decoder_heads")
        @classmethod
        def _divides_width(cls, value: int, info: ValidationInfo) -> int:
            width = info.data.get("decoder_dim")  # absent when decoder_dim itself was invalid
            if width is not None and width % value:
                raise ValueError(f"decoder_dim {width} is not divisible by {value} heads")
            return value

    decoder_pos_embed: torch.Tensor  # buffer (register_buffer in __init__)

    def __init__(self, encoder: nn.Module, feature_dim: int, in_channels: int, image_size: int,
                 **options: Any) -> None:
        super().__init__(encoder, feature_dim, in_channels, image_size, **options)
        _, vit = require_vit(encoder, self.name)
        dd, p = self.options.decoder_dim, vit.patch_size
        self.decoder_embed = nn.Linear(vit.dim, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        pos = torch.cat([torch.zeros(1, dd), sincos_pos_embed(dd, vit.grid, vit.grid)])[None]
        self.register_buffer("decoder_pos_embed", pos, persistent=False)
        self.decoder_blocks = nn.ModuleList([Block(dd, self.options.decoder_heads)
                                             for _ in range(self.options.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(dd)
        self.decoder_pred = nn.Linear(dd, p * p * in_channels)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def vit(self):
        return require_vit(self.encoder, self.name)[1]

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        return patchify(imgs, self.vit.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(x, self.vit.patch_size, self.in_channels)

    def random_masking(self, x: torch.Tensor, noise: torch.Tensor):
        return random_masking(x, self.options.mask_ratio, noise)

    def forward_encoder(self, imgs: torch.Tensor, noise: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalized images -> (latent (B, 1 + L_keep, D), mask (B, L), ids_restore (B, L))."""
        vit = self.vit
        x_kept, mask, ids_restore, _ = self.random_masking(vit.embed(imgs), noise)
        latent = vit.run_blocks(vit.with_cls(x_kept))
        return latent, mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Latent tokens + mask tokens, unshuffled -> (B, L, p*p*C) pixel predictions."""
        x = self.decoder_embed(latent)
        b, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(b, length + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)
        patches = torch.gather(patches, 1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return mae_loss(pred, self.patchify(imgs), mask, self.options.norm_pix_loss)

    def loss(self, images: torch.Tensor, targets: dict[str, torch.Tensor],
             generator: torch.Generator) -> torch.Tensor:
        normalize, vit = require_vit(self.encoder, self.name)
        if self.options.augment:
            images = shift_flip(images, generator, self.options.max_shift_px)
        imgs = normalize(images).contiguous()
        noise = per_sample_uniform(targets["mask_seed"], vit.num_patches).to(imgs.device)
        latent, mask, ids_restore = self.forward_encoder(imgs, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask)

    @classmethod
    def make_pseudo_labels(cls, num_images: int, epochs: int, seed: int) -> dict[str, np.ndarray]:
        """Adds ``mask_seed``: (epochs, N) int64, the seed of each sample's masking noise."""
        pseudo = super().make_pseudo_labels(num_images, epochs, seed)
        pseudo["mask_seed"] = sample_seeds(seed, 0x3AE, epochs, num_images)
        return pseudo

    @classmethod
    def preview_pairs(cls, images_uint8: np.ndarray, pseudo: dict[str, np.ndarray],
                      count: int, options: OptionsArg = None) -> list[tuple[np.ndarray, str]]:
        """(visible patches, full image) pairs of the first epoch; hidden patches drawn gray."""
        from ssl_lib.models.vit import default_patch_size

        opts = cls.resolve_options(options)
        n = min(max(1, count // 2), len(images_uint8))
        x = images_to_tensor(images_uint8[:n])
        p = default_patch_size(x.shape[-1])
        patches = patchify(x, p)
        noise = per_sample_uniform(torch.as_tensor(pseudo["mask_seed"][0, :n]), patches.shape[1])
        _, mask, _, _ = random_masking(patches, opts.mask_ratio, noise)
        shown = unpatchify(torch.where(mask[..., None].bool(), torch.full_like(patches, 0.5), patches), p, x.shape[1])
        visible, full = to_uint8(shown), to_uint8(x)
        pairs: list[tuple[np.ndarray, str]] = []
        for i in range(n):
            pairs += [(visible[i], f"#{i} visible"), (full[i], f"#{i} rebuild")]
        return pairs
