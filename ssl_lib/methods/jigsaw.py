"""Jigsaw puzzles (Noroozi & Favaro, 2016): shuffle the image's tiles by one of a fixed set of
permutations and classify which permutation was used, from shared-encoder tile features."""
from __future__ import annotations

import math
from functools import lru_cache
from itertools import permutations
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from ssl_lib.augment import shift_flip
from ssl_lib.errors import MethodRequirementError
from ssl_lib.methods._common import augment_option, images_to_tensor, max_shift_option, probe_encoder, to_uint8
from ssl_lib.methods.base import MethodOptions, OptionsArg, SSLMethod, register

# Pseudo labels hold raw draws; the permutation index is draw % num_permutations (the set size is
# an option, which make_pseudo_labels does not see). With draws below 2**31 the bias is < 1e-6.
_DRAW_RANGE = 2**31


@lru_cache(maxsize=8)
def _hamming_permutations_cached(cells: int, count: int) -> bytes:
    all_perms = np.array(list(permutations(range(cells))), dtype=np.int8)  # lexicographic order
    chosen = [0]  # start from the identity, the first permutation in lexicographic order
    min_dist = (all_perms != all_perms[0]).sum(1)
    for _ in range(count - 1):
        j = int(np.argmax(min_dist))  # first maximum: ties go to the lexicographically smallest
        chosen.append(j)
        min_dist = np.minimum(min_dist, (all_perms != all_perms[j]).sum(1))
    return all_perms[chosen].astype(np.int64).tobytes()


def hamming_permutations(cells: int, count: int) -> np.ndarray:
    """``count`` permutations of ``range(cells)``, (count, cells) int64, chosen greedily for maximal
    minimum Hamming distance.

    Start with the identity; then repeatedly add the permutation whose minimum Hamming distance
    (number of positions that differ) to the chosen ones is largest, ties broken by lexicographic
    order. Deterministic; no two chosen permutations coincide.
    """
    total = math.factorial(cells)
    if not 2 <= count <= total:
        raise ValueError(f"num_permutations must be in [2, {total}] for {cells} tiles, got {count}")
    if cells > 9:
        raise ValueError(f"at most 9 tiles (3x3 grid) are supported, got {cells}")
    return np.frombuffer(_hamming_permutations_cached(cells, count), dtype=np.int64).reshape(count, cells).copy()


def min_pairwise_hamming(perms: np.ndarray) -> int:
    """Smallest number of differing positions over all pairs of rows."""
    d = (perms[:, None, :] != perms[None, :, :]).sum(-1)
    d[np.diag_indices(len(perms))] = perms.shape[1] + 1
    return int(d.min())


def jigsaw_loss(logits: torch.Tensor, permutation_index: torch.Tensor) -> torch.Tensor:
    """Permutation classification.

        loss = 1/B sum_b -log softmax(h([f(t_{b, pi_b(1)}); ...; f(t_{b, pi_b(T)})]))_{k_b}

    where t_{b, j} is tile j of image b, pi_b = P[k_b] the permutation drawn for it from the fixed
    set P, f the shared encoder, [;] concatenation in puzzle order and h the classification head.
    """
    return F.cross_entropy(logits, permutation_index)


def tile_batch(images: torch.Tensor, grid: int, crop: int, offsets: torch.Tensor) -> torch.Tensor:
    """Cut each image into grid x grid cells and take a crop x crop tile from each cell.

    ``offsets``: (B, T, 2) integer (row, col) offset of each tile inside its cell, T = grid**2 in
    raster order. Returns (B, T, C, crop, crop).
    """
    b = images.shape[0]
    cell_h, cell_w = images.shape[-2] // grid, images.shape[-1] // grid
    t = torch.arange(grid * grid, device=images.device)
    top = (t // grid) * cell_h + offsets[..., 0]
    left = (t % grid) * cell_w + offsets[..., 1]
    ar = torch.arange(crop, device=images.device)
    rows = (top[..., None] + ar)[:, :, :, None]  # (B, T, crop, 1)
    cols = (left[..., None] + ar)[:, :, None, :]  # (B, T, 1, crop)
    bidx = torch.arange(b, device=images.device)[:, None, None, None]
    tiles = images[bidx, :, rows, cols]  # advanced indices around a slice: (B, T, crop, crop, C)
    return tiles.permute(0, 1, 4, 2, 3)


@register
class Jigsaw(SSLMethod["Jigsaw.Options"]):
    """Solve a grid x grid jigsaw: classify which of ``num_permutations`` fixed permutations shuffled the tiles.

    Each cell yields a (cell - tile_jitter)-pixel tile at a random offset (so tiles do not line up
    exactly across borders, a classic shortcut). The encoder embeds every tile separately; the
    features are concatenated in puzzle order and an MLP head predicts the permutation index.
    Defaults suit 16x16-32x32 images: a 2x2 grid and all 24 of its permutations.
    With vit_tiny the tile side must be a multiple of its patch size (e.g. tile_jitter=0 on 16x16).
    """

    name = "jigsaw"
    family = "pretext"

    class Options(MethodOptions):
        # 3x3 (9 tiles) is the most hamming_permutations enumerates: 9! permutations.
        grid: int = Field(2, ge=2, le=3, description="tiles per side: a grid x grid puzzle")
        num_permutations: int = Field(24, ge=2, description="size of the permutation set, at most (grid^2)!")
        tile_jitter: int = Field(1, ge=0, description="pixels cut from each cell, so tiles sit at random offsets")
        head_hidden: int = Field(256, ge=1, description="hidden width of the permutation classifier")
        augment: bool = augment_option()
        max_shift_px: int = max_shift_option(1)

        @field_validator("num_permutations")
        @classmethod
        def _at_most_all(cls, value: int, info: ValidationInfo) -> int:
            grid = info.data.get("grid")  # absent when grid itself was invalid: that error is reported
            if grid is not None and value > math.factorial(grid * grid):
                raise ValueError(f"a {grid}x{grid} grid has only {math.factorial(grid * grid)} permutations, "
                                 f"got {value}")
            return value

    permutations: torch.Tensor  # buffer (register_buffer in __init__)

    def __init__(self, encoder: nn.Module, feature_dim: int, in_channels: int, image_size: int,
                 **options: Any) -> None:
        super().__init__(encoder, feature_dim, in_channels, image_size, **options)
        grid, jitter = self.options.grid, self.options.tile_jitter
        self.grid, self.cell = grid, image_size // grid
        self.crop = self.cell - jitter
        if self.crop < 2:
            raise MethodRequirementError(
                f"jigsaw: {image_size}px images in a {grid}x{grid} grid give {self.cell}px cells; "
                f"tile_jitter={jitter} leaves no usable tile: lower pretrain.options.jigsaw.grid or tile_jitter")
        perms = hamming_permutations(grid * grid, self.options.num_permutations)
        self.register_buffer("permutations", torch.as_tensor(perms), persistent=False)
        probe_encoder(encoder, in_channels, self.crop, self.crop, feature_dim,
                      f"jigsaw with a {grid}x{grid} grid on {image_size}px images ({self.crop}px tiles)")
        hidden, tiles, classes = self.options.head_hidden, grid * grid, len(perms)
        self.head = nn.Sequential(nn.Linear(tiles * feature_dim, hidden), nn.BatchNorm1d(hidden),
                                  nn.ReLU(inplace=True), nn.Linear(hidden, classes))

    def loss(self, images: torch.Tensor, targets: dict[str, torch.Tensor],
             generator: torch.Generator) -> torch.Tensor:
        labels = (targets["jigsaw"].long() % self.permutations.shape[0]).to(images.device)
        if self.options.augment:
            images = shift_flip(images, generator, self.options.max_shift_px)
        b, tiles = images.shape[0], self.grid * self.grid
        jitter = self.cell - self.crop
        offsets = torch.randint(0, jitter + 1, (b, tiles, 2), generator=generator, device=generator.device)
        pieces = tile_batch(images, self.grid, self.crop, offsets.to(images.device))
        order = self.permutations[labels]  # (B, T): position i shows tile order[i]
        shuffled = torch.gather(pieces, 1, order[:, :, None, None, None].expand_as(pieces))
        feats = self.encoder(shuffled.reshape(b * tiles, *pieces.shape[2:]))
        logits = self.head(feats.reshape(b, tiles * feats.shape[-1]))
        with torch.no_grad():
            self.last_stats = {"pretext_acc": (logits.argmax(1) == labels).float().mean()}
        return jigsaw_loss(logits, labels)

    @classmethod
    def make_pseudo_labels(cls, num_images: int, epochs: int, seed: int) -> dict[str, np.ndarray]:
        """Adds ``jigsaw``: (epochs, N) int64 draws; the permutation index is draw % num_permutations."""
        pseudo = super().make_pseudo_labels(num_images, epochs, seed)
        rng = np.random.default_rng([seed, 0x7165])
        pseudo["jigsaw"] = rng.integers(0, _DRAW_RANGE, size=(epochs, num_images), dtype=np.int64)
        return pseudo

    @classmethod
    def preview_pairs(cls, images_uint8: np.ndarray, pseudo: dict[str, np.ndarray],
                      count: int, options: OptionsArg = None) -> list[tuple[np.ndarray, str]]:
        """The first epoch's puzzles: each image with its (whole-cell) tiles shuffled, captioned
        with the permutation index the model must predict."""
        opts = cls.resolve_options(options)
        grid = opts.grid
        perms = hamming_permutations(grid * grid, opts.num_permutations)
        n = min(count, len(images_uint8))
        if n == 0:
            return []
        x = images_to_tensor(images_uint8[:n])
        cell = x.shape[-1] // grid
        pieces = tile_batch(x, grid, cell, torch.zeros(n, grid * grid, 2, dtype=torch.long))
        pairs = []
        for i in range(n):
            k = int(pseudo["jigsaw"][0, i]) % len(perms)
            canvas = torch.zeros(x.shape[1], grid * cell, grid * cell)
            for pos, tile in enumerate(perms[k]):
                r, c = divmod(pos, grid)
                canvas[:, r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = pieces[i, tile]
            pairs.append((to_uint8(canvas[None])[0], f"perm {k}"))
        return pairs
