"""RotNet (Gidaris et al., 2018): predict which of four rotations (0, 90, 180, 270 degrees) was applied."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ssl_lib.augment import shift_flip
from ssl_lib.errors import MethodRequirementError
from ssl_lib.methods._common import augment_option, max_shift_option
from ssl_lib.methods.base import MethodOptions, OptionsArg, SSLMethod, register


def rotate_batch(images: torch.Tensor, quarter_turns: torch.Tensor) -> torch.Tensor:
    """Rotate sample i by ``quarter_turns[i]`` x 90 degrees counter-clockwise (square images only).

    Four masked ``rot90`` calls, one per rotation class, instead of a loop over images.
    """
    out = images.clone()
    for k in range(1, 4):
        mask = quarter_turns == k
        if bool(mask.any()):
            out[mask] = torch.rot90(images[mask], k, dims=(2, 3))
    return out


@register
class RotationPrediction(SSLMethod["RotationPrediction.Options"]):
    """4-way rotation classification with a head on the encoder features.

    loss = CE(head(f(rot_k(aug(x)))), k),  k ~ U{0, 1, 2, 3} fixed per epoch and sample by the pseudo labels.

    A horizontal flip and a small shift are applied before rotating: neither changes which way
    is up, and they keep the encoder from memorising exact pixel positions.
    """

    name = "rotation"
    family = "pretext"

    class Options(MethodOptions):
        head_hidden: int = Field(256, ge=0, description="hidden width of the rotation head; 0: a linear head")
        augment: bool = augment_option()
        max_shift_px: int = max_shift_option(2)


    def __init__(self, encoder: nn.Module, feature_dim: int, in_channels: int, image_size: int,
                 **options: Any) -> None:
        super().__init__(encoder, feature_dim, in_channels, image_size, **options)
        hidden = self.options.head_hidden
        if hidden > 0:
            self.head: nn.Module = nn.Sequential(nn.Linear(feature_dim, hidden), nn.BatchNorm1d(hidden),
                                                 nn.ReLU(inplace=True), nn.Linear(hidden, 4))
        else:
            self.head = nn.Linear(feature_dim, 4)

    def loss(self, images: torch.Tensor, targets: dict[str, torch.Tensor],
             generator: torch.Generator) -> torch.Tensor:
        if images.shape[-1] != images.shape[-2]:
            raise MethodRequirementError(f"rotation prediction needs square images, got {tuple(images.shape[-2:])}")
        labels = targets["rotation"].long()
        if self.options.augment:
            images = shift_flip(images, generator, self.options.max_shift_px)
        logits = self.head(self.encoder(rotate_batch(images, labels)))
        loss = F.cross_entropy(logits, labels)
        with torch.no_grad():
            self.last_stats = {"pretext_acc": (logits.argmax(1) == labels).float().mean()}
        return loss

    @classmethod
    def make_pseudo_labels(cls, num_images: int, epochs: int, seed: int) -> dict[str, np.ndarray]:
        pseudo = super().make_pseudo_labels(num_images, epochs, seed)
        rng = np.random.default_rng([seed, 0x0407])
        pseudo["rotation"] = rng.integers(0, 4, size=(epochs, num_images), dtype=np.int8)
        return pseudo

    @classmethod
    def preview_pairs(cls, images_uint8: np.ndarray, pseudo: dict[str, np.ndarray],
                      count: int, options: OptionsArg = None) -> list[tuple[np.ndarray, str]]:
        pairs = []
        for i in range(min(count, len(images_uint8))):
            k = int(pseudo["rotation"][0, i])
            # np.rot90 on axes (0, 1) of HWC turns counter-clockwise, like torch.rot90 on (H, W).
            pairs.append((np.ascontiguousarray(np.rot90(images_uint8[i], k, axes=(0, 1))), f"rot {90 * k}°"))
        return pairs
