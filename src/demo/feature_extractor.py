"""A tiny seeded feature extractor for IS/FID on the offline demo, where the Inception weights are not at hand.

Its numbers compare only with other numbers from the same extractor: never beside a paper's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _images_to_unit_float(images: Tensor) -> Tensor:
    if images.dtype == torch.uint8:
        return images.float() / 255
    return images.float().clamp(0, 1)


class SmallFeatureExtractor(nn.Module):
    """Tiny seeded random conv net: 64-d features and 10 logits. Numbers are comparable only within this net."""

    def __init__(
        self, num_features: int = 64, num_classes: int = 10, image_size: int = 64, seed: int = 0
    ) -> None:
        super().__init__()
        if num_features % 2:
            raise ValueError("num_features must be even (mean and std of each channel).")
        self.num_features = num_features
        self.num_classes = num_classes
        self.image_size = image_size
        channels = num_features // 2
        # Built under a private seed so every run, rank and test gets the same weights.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.convs = nn.ModuleList(
                [
                    nn.Conv2d(3, 16, 3, stride=2, padding=1),
                    nn.Conv2d(16, channels, 3, stride=2, padding=1),
                    nn.Conv2d(channels, channels, 3, stride=2, padding=1),
                ]
            )
            for conv in self.convs:
                # He init keeps activations at unit scale through the random layers, so distances are not tiny.
                nn.init.kaiming_normal_(conv.weight, a=0.2, nonlinearity="leaky_relu")
                nn.init.zeros_(conv.bias)
            self.head = nn.Linear(num_features, num_classes)
            # Random features vary little (std ~0.25), so default-scale logits give near-uniform class
            # probabilities and an IS stuck at 1.0 for any image set; x20 makes the classes decisive.
            self.head.weight.data.mul_(20.0)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> SmallFeatureExtractor:
        """Always in evaluation mode: the metric must not change when Lightning toggles train/eval."""
        return super().train(False)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = _images_to_unit_float(images.to(self.head.weight.device))
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True) * 2 - 1
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.2)
        # Mean and spread of every channel: colour and texture statistics in one vector.
        features = torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)
        return features, self.head(features)
