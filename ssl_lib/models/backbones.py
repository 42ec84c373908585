"""Image encoders: a normalized float batch (B, C, H, W) goes in, a feature batch (B, D) comes out."""
from __future__ import annotations

import torch
from torch import nn

# "convnet" is the CPU default: four conv layers, ~1000 img/s fwd+bwd on 28x28 with 2 CPU cores.
BACKBONES: tuple[str, ...] = ("convnet", "convnet_small", "convnet_wide", "resnet18", "vit_tiny")

_CONVNET_WIDTHS = {"convnet": 32, "convnet_small": 16, "convnet_wide": 64}


class ConvNet(nn.Module):
    """Four conv-BN-ReLU layers (widths w, 2w, 4w, 8w), max-pooling between BN and ReLU, then global average pooling.

    Pooling stops once the map would drop below 3x3, so that the same design works from 8x8
    (digits) to 32x32 (CIFAR) without the last layers convolving a 1x1 map.
    """

    def __init__(self, in_channels: int, image_size: int, width: int = 32) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        layers: list[nn.Module] = []
        size, pools, channels = image_size, 0, in_channels
        for i, out in enumerate(widths):
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out)]
            if i < len(widths) - 1 and pools < 3 and size // 2 >= 3:
                # Pooling before the ReLU: the same values and gradients (max-pooling commutes with a monotone
                # function), with the ReLU and its backward on a quarter of the elements.
                layers.append(nn.MaxPool2d(2))
                size //= 2
                pools += 1
            layers.append(nn.ReLU(inplace=True))
            channels = out
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.layers(x)).flatten(1)


class _ResNetEncoder(nn.Module):
    def __init__(self, in_channels: int) -> None:
        super().__init__()
        from torchvision.models import resnet18  # imported lazily: torchvision is slow to import

        net = resnet18(weights=None)
        # Small images: a 3x3 stride-1 stem and no max-pool keep enough spatial resolution.
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        net.fc = nn.Identity()
        self.net = net
        self.feature_dim = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_backbone(name: str, in_channels: int, image_size: int) -> tuple[nn.Module, int]:
    """Return ``(encoder, feature_dim)`` for backbone ``name``; unknown names raise ValueError."""
    if in_channels < 1 or image_size < 4:
        raise ValueError(f"need in_channels >= 1 and image_size >= 4, got {in_channels} and {image_size}")
    if name in _CONVNET_WIDTHS:
        net = ConvNet(in_channels, image_size, _CONVNET_WIDTHS[name])
        return net, net.feature_dim
    if name == "resnet18":
        enc = _ResNetEncoder(in_channels)
        return enc, enc.feature_dim
    if name == "vit_tiny":
        from ssl_lib.models.vit import build_vit_tiny  # the token-based encoder of mae and autoregressive

        return build_vit_tiny(in_channels, image_size)
    raise ValueError(f"unknown backbone {name!r}; known backbones: {', '.join(BACKBONES)}")


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())




class Normalize(nn.Module):
    """(x - mean) / std per channel, with mean/std as buffers so they travel with the state_dict."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"mean and std need one entry per channel and std > 0, got {mean} and {std}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels_last is what the CPU (oneDNN) and tensor-core convolutions are fastest with.
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)


class NormalizedEncoder(nn.Module):
    """An encoder that takes images in [0, 1]; ``encoder`` is the part whose weights are exported."""

    def __init__(self, encoder: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.normalize(x))


__all__ = ["BACKBONES", "ConvNet", "Normalize", "NormalizedEncoder", "build_backbone", "count_parameters"]
