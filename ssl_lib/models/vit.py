"""A small Vision Transformer for 16x16 to 32x32 images ("vit_tiny"), with the token-level API that
masked (MAE) and autoregressive pretraining need.

Layout follows MAE's models_mae.py / timm: a strided-conv patch embedding, a class token, fixed 2-D
sin-cos position embeddings, pre-norm blocks and a final LayerNorm. ``forward(x)`` returns pooled
(B, dim) features like every other backbone; the pieces are public so methods can drive them:

* ``embed(x)`` -> (B, L, D) patch tokens with position embeddings (L = patches in raster order);
* ``keep_ids`` (MAE) selects visible tokens; ``attn_mask`` / ``causal`` restrict attention;
* ``forward_tokens(x, keep_ids=None, causal=False, attn_mask=None)`` -> (B, 1 + L', D) after the
  final norm, class token first.

The position embeddings are computed for whatever patch grid comes in (non-persistent buffer
cache), so the same weights also encode smaller inputs such as jigsaw tiles, as long as each side
is a multiple of ``patch_size``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def sincos_pos_embed(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (grid_h * grid_w, dim), as in MAE: half the channels
    encode the row, half the column, each as sin/cos of the position at geometric frequencies."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                                torch.arange(grid_w, dtype=torch.float64), indexing="ij")
    parts = []
    for pos in (rows.reshape(-1), cols.reshape(-1)):
        angles = pos[:, None] * omega[None, :]
        parts += [torch.sin(angles), torch.cos(angles)]
    return torch.cat(parts, dim=1).float()


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal and attn_mask is None)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), attn_mask=attn_mask, causal=causal)
        return x + self.mlp(self.norm2(x))


def default_patch_size(image_size: int) -> int:
    """4 when it divides the image side (16, 28, 32), else 7 (e.g. 21), else ValueError."""
    for p in (4, 7):
        if image_size % p == 0:
            return p
    raise ValueError(f"vit_tiny needs an image side divisible by 4 or 7, got {image_size}")


class ViT(nn.Module):
    """Small ViT. ``forward(x)``: (B, C, H, W) normalized images -> (B, dim) features (mean of the
    patch tokens after the final norm, or the class token with ``pool="cls"``)."""

    pos_embed: torch.Tensor  # buffer (register_buffer in __init__)

    def __init__(self, in_channels: int, image_size: int, patch_size: int | None = None, dim: int = 128,
                 depth: int = 4, heads: int = 4, mlp_ratio: float = 2.0, pool: str = "mean") -> None:
        super().__init__()
        patch_size = patch_size or default_patch_size(image_size)
        if image_size % patch_size:
            raise ValueError(f"image side {image_size} is not a multiple of patch_size {patch_size}")
        if pool not in ("mean", "cls"):
            raise ValueError(f"pool must be 'mean' or 'cls', got {pool!r}")
        self.in_channels, self.image_size, self.patch_size = in_channels, image_size, patch_size
        self.grid = image_size // patch_size
        self.num_patches = self.grid * self.grid
        self.dim = self.feature_dim = dim
        self.heads, self.pool = heads, pool
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.register_buffer("pos_embed", sincos_pos_embed(dim, self.grid, self.grid)[None], persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        # As in MAE: xavier-uniform linears (and the patch projection viewed as one), small cls token.
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        assert self.patch_embed.bias is not None  # Conv2d's default bias=True
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def pos_embed_for(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """(1, grid_h * grid_w, dim) position embeddings for a patch grid of that shape."""
        if (grid_h, grid_w) == (self.grid, self.grid):
            return self.pos_embed
        return sincos_pos_embed(self.dim, grid_h, grid_w)[None].to(self.pos_embed)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens plus position embeddings: (B, C, H, W) -> (B, L, D), raster order."""
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"vit_tiny input sides must be multiples of patch_size {self.patch_size}, "
                             f"got {h}x{w}")
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        return tokens + self.pos_embed_for(h // self.patch_size, w // self.patch_size)

    def with_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        """Prepend the class token (its position embedding is zero, as in MAE)."""
        return torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)

    def run_blocks(self, tokens: torch.Tensor, attn_mask: torch.Tensor | None = None,
                   causal: bool = False) -> torch.Tensor:
        """All blocks and the final norm. ``attn_mask``: bool, True = may attend, broadcastable to
        (B, heads, T, T); ``causal``: token t attends to tokens <= t (ignored when attn_mask is given)."""
        for block in self.blocks:
            tokens = block(tokens, attn_mask=attn_mask, causal=causal)
        return self.norm(tokens)

    def forward_tokens(self, x: torch.Tensor, keep_ids: torch.Tensor | None = None, causal: bool = False,
                       attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1 + L', D) normed tokens, class token first.

        ``keep_ids`` (B, L') keeps only those patch tokens (MAE's visible set); ``causal`` /
        ``attn_mask`` as in ``run_blocks`` (over the 1 + L' tokens)."""
        tokens = self.embed(x)
        if keep_ids is not None:
            tokens = torch.gather(tokens, 1, keep_ids[..., None].expand(-1, -1, tokens.shape[-1]))
        return self.run_blocks(self.with_cls(tokens), attn_mask=attn_mask, causal=causal)

    def pool_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 0] if self.pool == "cls" else tokens[:, 1:].mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool_tokens(self.forward_tokens(x))


def build_vit_tiny(in_channels: int, image_size: int) -> tuple[ViT, int]:
    """``(encoder, feature_dim)`` like ``build_backbone``: dim 128, depth 4, heads 4, patch 4 (or 7)."""
    net = ViT(in_channels, image_size)
    return net, net.feature_dim


__all__ = ["Block", "ViT", "build_vit_tiny", "default_patch_size", "sincos_pos_embed"]
