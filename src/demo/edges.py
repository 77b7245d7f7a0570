"""The generated shapes with their Canny edges, drawn on the fly: the data of the ControlNet demo.

Sample ``i`` of a split is the scene and drawing of ``synthetic_sample(split, i, seed)`` (the shards' sample of
the same index, at this image size), its control image (the detector's output on the drawing) and one English
caption, its template drawn by the sample's own RNG. Nothing is written to disk; the same settings give the same
items in every process, and each item is kept in memory once drawn (a few KiB at 32 px).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from src.data.controls import Detector
from src.data.schema import SPLITS
from src.demo.splits import GeneratedSplitsDataModule
from src.demo.synthetic import (
    NUM_TEMPLATES,
    Scene,
    caption_scene,
    render_scene,
    split_counts,
    synthetic_scene,
)

__all__ = ["EdgeScene", "SyntheticEdgesDataModule", "SyntheticEdgesDataset", "edge_scene"]


@dataclass(frozen=True)
class EdgeScene:
    """A generated scene drawn at one size, its control image and an English caption."""

    scene: Scene
    style: str
    image: Image.Image
    control: Image.Image
    caption: str


def edge_scene(split: str, index: int, image_size: int, detector: Detector, seed: int = 0) -> EdgeScene:
    """Sample ``index`` of ``split`` (the synthetic dataset's scene, drawing and caption RNG) with its control."""
    scene, style, rng = synthetic_scene(split, index, seed)
    image = render_scene(scene, style, image_size, rng)
    caption = caption_scene(scene, "en", rng.randrange(NUM_TEMPLATES), style)
    return EdgeScene(scene, style, image, detector(image), caption)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image -> float [3, H, W] in [0, 1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 255.0


class SyntheticEdgesDataset(Dataset):
    """Items ``{"pixel_values": [3, S, S] in [-1, 1], "control": [3, S, S] in [0, 1], "caption": str,
    "cache_key": int}``; the key names the item's pixels, so the trainer may cache their latents."""

    def __init__(
        self, split: str, num_samples: int, image_size: int, detector: Detector, seed: int = 0
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.split, self.num_samples, self.image_size, self.seed = split, num_samples, image_size, seed
        self.detector = detector
        self._drawn: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} {self.split} samples")
        if index not in self._drawn:
            drawn = edge_scene(self.split, index, self.image_size, self.detector, self.seed)
            self._drawn[index] = {
                "pixel_values": to_tensor(drawn.image) * 2.0 - 1.0,
                "control": to_tensor(drawn.control),
                "caption": drawn.caption,
                "cache_key": SPLITS.index(self.split) * 10_000_000 + index,
            }
        return self._drawn[index]


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "control": torch.stack([item["control"] for item in items]),
        "captions": [item["caption"] for item in items],
        "cache_key": torch.tensor([item["cache_key"] for item in items], dtype=torch.long),
    }


class SyntheticEdgesDataModule(GeneratedSplitsDataModule):
    """Train, val and test splits of ``num_samples`` generated scenes with their controls, split as the synthetic
    shards are."""

    collate_fn = staticmethod(collate)

    def __init__(
        self,
        image_size: int,
        detector: Detector,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        num_samples: int = 5000,
        split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
        seed: int = 0,
        shuffle_seed: int = 0,
    ) -> None:
        """``seed``: the scenes drawn (the synthetic shards' ``data.builders.dataset.seed``); ``shuffle_seed``:
        the training order (the run's seed in the configs)."""
        super().__init__()
        if image_size < 1 or batch_size < 1:
            raise ValueError(
                f"data.image_size and data.batch_size must be positive, got {image_size} and {batch_size}"
            )
        self.save_hyperparameters(ignore=["detector"], logger=False)
        self.datasets = {
            split: SyntheticEdgesDataset(split, count, image_size, detector, seed)
            for split, count in split_counts(num_samples, split_fractions).items()
        }
