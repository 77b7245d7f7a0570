"""CartoonGAN's generator (Chen et al., CVPR 2018) as the published PyTorch weights lay it out.

The published files (``{Hayao,Hosoda,Paprika,Shinkai}_net_G_float.pth``, converted from the authors' Torch7
models by CartoonGAN-Test-Pytorch-Torch) are plain state dicts whose keys name each layer of one flat module:
``conv01_1``, ``in01_1``, eight residual blocks ``conv04_*`` .. ``conv11_*``, ``deconv01_1`` .. ``deconv03_1``.
The attribute names below are those keys, so the files load with ``strict=True``. Written by hand: no library
ships this network, and it is ~60 lines.

The weights were trained on BGR images in [-1, 1], and the published test resizes the longer side to 450
(bicubic) first; :meth:`CartoonGAN.to_input` / :meth:`CartoonGAN.to_image` do that conversion on batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

RESIDUAL_BLOCKS = range(4, 12)  # conv04_* .. conv11_*
LOAD_SIZE = 450  # the longer side the published test resizes every image to


class InstanceNormalization(nn.Module):
    """Instance norm with the Torch7 port's parameter names (``scale``, ``shift``), eps 1e-9, no running stats."""

    def __init__(self, channels: int, eps: float = 1e-9) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels))
        self.shift = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the port's hand-written mean / biased variance is exactly F.instance_norm, in one fused kernel
        return F.instance_norm(x, weight=self.scale, bias=self.shift, eps=self.eps)


class CartoonGAN(nn.Module):
    """Photo (BGR, [-1, 1]) -> cartoon (BGR, [-1, 1]): 3 down-convolutions, 8 residual blocks, 2 up-convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.refpad01_1 = nn.ReflectionPad2d(3)
        self.conv01_1 = nn.Conv2d(3, 64, 7)
        self.in01_1 = InstanceNormalization(64)
        self.conv02_1 = nn.Conv2d(64, 128, 3, stride=2, padding=1)
        self.conv02_2 = nn.Conv2d(128, 128, 3, padding=1)
        self.in02_1 = InstanceNormalization(128)
        self.conv03_1 = nn.Conv2d(128, 256, 3, stride=2, padding=1)
        self.conv03_2 = nn.Conv2d(256, 256, 3, padding=1)
        self.in03_1 = InstanceNormalization(256)
        for block in RESIDUAL_BLOCKS:  # flat names, as the published state dicts have them
            for half in (1, 2):
                setattr(self, f"refpad{block:02d}_{half}", nn.ReflectionPad2d(1))
                setattr(self, f"conv{block:02d}_{half}", nn.Conv2d(256, 256, 3))
                setattr(self, f"in{block:02d}_{half}", InstanceNormalization(256))
        self.deconv01_1 = nn.ConvTranspose2d(256, 128, 3, stride=2, padding=1, output_padding=1)
        self.deconv01_2 = nn.Conv2d(128, 128, 3, padding=1)
        self.in12_1 = InstanceNormalization(128)
        self.deconv02_1 = nn.ConvTranspose2d(128, 64, 3, stride=2, padding=1, output_padding=1)
        self.deconv02_2 = nn.Conv2d(64, 64, 3, padding=1)
        self.in13_1 = InstanceNormalization(64)
        self.refpad12_1 = nn.ReflectionPad2d(3)
        self.deconv03_1 = nn.Conv2d(64, 3, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.in01_1(self.conv01_1(self.refpad01_1(x))))
        y = F.relu(self.in02_1(self.conv02_2(self.conv02_1(y))))
        y = F.relu(self.in03_1(self.conv03_2(self.conv03_1(y))))
        for block in RESIDUAL_BLOCKS:
            y = y + self._residual(block, y)  # no ReLU after the sum
        y = F.relu(self.in12_1(self.deconv01_2(self.deconv01_1(y))))
        y = F.relu(self.in13_1(self.deconv02_2(self.deconv02_1(y))))
        return torch.tanh(self.deconv03_1(self.refpad12_1(y)))

    def _residual(self, block: int, x: torch.Tensor) -> torch.Tensor:
        y = x
        for half in (1, 2):
            pad, conv, norm = (
                getattr(self, f"{kind}{block:02d}_{half}") for kind in ("refpad", "conv", "in")
            )
            y = norm(conv(pad(y)))
            y = F.relu(y) if half == 1 else y
        return y

    @torch.inference_mode()
    def cartoonize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 RGB photos [N, H, W, 3] -> uint8 RGB cartoons of the same size."""
        height, width = pixels.shape[1:3]
        # a side that is not a multiple of 4 comes back up to 3 pixels longer (stride-2 convolutions, then
        # transposed ones with output_padding 1); the extra rows and columns lie beyond the input's edge
        return self.to_image(self(self.to_input(pixels))[..., :height, :width])

    @staticmethod
    def to_input(pixels: torch.Tensor) -> torch.Tensor:
        """uint8 RGB images [N, H, W, 3] -> the network's input: float BGR [N, 3, H, W] in [-1, 1]."""
        return pixels.flip(-1).permute(0, 3, 1, 2).float().div(255).mul(2).sub(1)

    @staticmethod
    def to_image(output: torch.Tensor) -> torch.Tensor:
        """The network's BGR output in [-1, 1] -> uint8 RGB [N, H, W, 3], rounded as torchvision's save_image does."""
        rgb = output.flip(1).mul(0.5).add(0.5)
        return rgb.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
