"""AnimeGANv2's generator as animegan2-pytorch publishes its weights (``paprika``, ``face_paint_512_v2``, ...).

bryandlee/animegan2-pytorch converted the TensorFlow AnimeGANv2 models and published state dicts
(``weights/<name>.pt``) whose keys follow nested ``nn.Sequential`` indices: ``block_a.0.1.weight`` is the
convolution of the first conv-norm-activation unit of ``block_a``, ``block_c.1.layers.*`` an inverted residual
block. The modules below are nested the same way, so the files load with ``strict=True``. Written by hand, as
no library ships it. Input and output are RGB in [-1, 1]. Upsampling is to the exact sizes of the way down with
``align_corners=True``, as the published ``face2paint`` runs it (its ``test.py`` can double instead, which
misses sizes that are not multiples of 4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvNormLReLU(nn.Sequential):
    """Reflection pad -> convolution without bias -> GroupNorm(1, C) -> LeakyReLU(0.2), indexed 0..3."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | tuple[int, int, int, int] = 1,
        groups: int = 1,
        bias: bool = False,
    ) -> None:
        super().__init__(
            nn.ReflectionPad2d(padding),
            nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, groups=groups, bias=bias),
            nn.GroupNorm(num_groups=1, num_channels=out_channels),
            nn.LeakyReLU(0.2, inplace=True),
        )


class InvertedResBlock(nn.Module):
    """MobileNetV2's block: 1x1 expansion, depthwise 3x3 (with bias), 1x1 projection + GroupNorm; skip if shapes match."""

    def __init__(self, in_channels: int, out_channels: int, expansion: int = 2) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.use_skip = in_channels == out_channels
        self.layers = nn.Sequential(
            ConvNormLReLU(in_channels, hidden, kernel_size=1, padding=0),
            ConvNormLReLU(hidden, hidden, groups=hidden, bias=True),
            nn.Conv2d(hidden, out_channels, kernel_size=1, bias=False),
            nn.GroupNorm(num_groups=1, num_channels=out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layers(x)
        return x + y if self.use_skip else y


class AnimeGANv2(nn.Module):
    """Photo (RGB, [-1, 1]) -> anime (RGB, [-1, 1]): down to 1/4 size, 4 inverted residual blocks, back up."""

    def __init__(self) -> None:
        super().__init__()
        # (0, 1, 0, 1): pad right and bottom only, as TensorFlow's "same" padding does for stride 2
        self.block_a = nn.Sequential(
            ConvNormLReLU(3, 32, kernel_size=7, padding=3),
            ConvNormLReLU(32, 64, stride=2, padding=(0, 1, 0, 1)),
            ConvNormLReLU(64, 64),
        )
        self.block_b = nn.Sequential(
            ConvNormLReLU(64, 128, stride=2, padding=(0, 1, 0, 1)),
            ConvNormLReLU(128, 128),
        )
        self.block_c = nn.Sequential(
            ConvNormLReLU(128, 128),
            InvertedResBlock(128, 256),
            InvertedResBlock(256, 256),
            InvertedResBlock(256, 256),
            InvertedResBlock(256, 256),
            ConvNormLReLU(256, 128),
        )
        self.block_d = nn.Sequential(ConvNormLReLU(128, 128), ConvNormLReLU(128, 128))
        self.block_e = nn.Sequential(
            ConvNormLReLU(128, 64),
            ConvNormLReLU(64, 64),
            ConvNormLReLU(64, 32, kernel_size=7, padding=3),
        )
        self.out_layer = nn.Sequential(nn.Conv2d(32, 3, kernel_size=1, bias=False), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.block_a(x)
        y = self.block_c(self.block_b(half))
        y = self.block_d(F.interpolate(y, half.shape[-2:], mode="bilinear", align_corners=True))
        y = self.block_e(F.interpolate(y, x.shape[-2:], mode="bilinear", align_corners=True))
        return self.out_layer(y)

    @torch.inference_mode()
    def cartoonize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 RGB photos [N, H, W, 3] -> uint8 RGB cartoons of the same size."""
        return self.to_image(self(self.to_input(pixels)))

    @staticmethod
    def to_input(pixels: torch.Tensor) -> torch.Tensor:
        """uint8 RGB images [N, H, W, 3] -> float RGB [N, 3, H, W] in [-1, 1]."""
        return pixels.permute(0, 3, 1, 2).float().div(127.5).sub(1)

    @staticmethod
    def to_image(output: torch.Tensor) -> torch.Tensor:
        """RGB in [-1, 1] -> uint8 RGB [N, H, W, 3], truncated as the published test's ``astype(uint8)``."""
        return output.add(1).mul(127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
