"""The generated shapes with their true depth maps, drawn on the fly: the data of the depth-to-image demo.

Sample ``i`` of a split is the scene and drawing of ``synthetic_sample(split, i, seed)`` (the shards' sample of
the same index, at this image size), its depth map from the renderer (``render_scene_with_depth``: the shape's
silhouette in front of a receding ground plane) and one English caption, its template drawn by the sample's own
RNG. Nothing is written to disk; the same settings give the same items in every process. Each item is kept in
memory once drawn (16 KiB at 32 px): drawing one costs ~10 ms, a training step on 32 of them ~0.5 s, and a run
sees every item several times.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from src.data.schema import SPLITS
from src.demo.splits import GeneratedSplitsDataModule
from src.demo.synthetic import (
    NUM_TEMPLATES,
    caption_scene,
    render_scene_with_depth,
    split_counts,
    synthetic_scene,
)

__all__ = ["SyntheticDepthDataModule", "SyntheticDepthDataset"]


class SyntheticDepthDataset(Dataset):
    """Items ``{"image": [3, S, S] in [-1, 1], "depth": [1, S, S] in [0, 1] (near = 1), "caption": str}``."""

    def __init__(self, split: str, num_samples: int, image_size: int, seed: int = 0) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.split, self.num_samples, self.image_size, self.seed = split, num_samples, image_size, seed
        self._drawn: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} {self.split} samples")
        if index not in self._drawn:
            self._drawn[index] = self._draw(index)
        return self._drawn[index]

    def _draw(self, index: int) -> dict[str, Any]:
        scene, style, rng = synthetic_scene(self.split, index, self.seed)
        image, depth = render_scene_with_depth(scene, style, self.image_size, rng)
        caption = caption_scene(scene, "en", rng.randrange(NUM_TEMPLATES), style)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
        return {"image": pixels, "depth": torch.from_numpy(depth)[None], "caption": caption}


class SyntheticDepthDataModule(GeneratedSplitsDataModule):
    """Train, val and test splits of ``num_samples`` generated scenes, split as the synthetic shards are."""

    def __init__(
        self,
        image_size: int,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        num_samples: int = 5000,
        split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
        seed: int = 0,
        shuffle_seed: int = 0,
    ) -> None:
        """``image_size``: the depth-to-image model's (``${model.image_size}`` in the configs); ``seed``: the
        scenes drawn (the synthetic shards' ``data.builders.dataset.seed``); ``shuffle_seed``: the training
        order (the run's seed in the configs)."""
        super().__init__()
        if image_size < 1 or batch_size < 1:
            raise ValueError(
                f"data.image_size and data.batch_size must be positive, got {image_size} and {batch_size}"
            )
        self.save_hyperparameters(logger=False)
        self.datasets = {
            split: SyntheticDepthDataset(split, count, image_size, seed)
            for split, count in split_counts(num_samples, split_fractions).items()
        }
