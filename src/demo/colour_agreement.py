"""Does a generator follow its caption, and does it use its noise? Checks that only the shapes demo can make.

On the generated dataset a caption names the shape's colour, so the share of generated images whose dominant
colour is the named one measures caption following, per language (chance = 1/8). Diversity is the mean pairwise
pixel distance between images drawn for one caption, beside the same for real drawings of that caption: a
generator that ignores its noise (GAN-CLS's mode collapse) scores ~0 against the real images' jitter.
"""

from __future__ import annotations

import itertools

import lightning as L
import torch
from torchvision.transforms.functional import pil_to_tensor

from src.demo.synthetic import COLOURS, colour_caption_set, dominant_colour
from src.pipelines.loading import text_to_image_for
from src.utils.image_grid import to_pil


def mean_pairwise_distance(images: torch.Tensor) -> float:
    """Mean root-mean-square pixel distance over all pairs of images [k, 3, H, W] in [0, 1]."""
    flat = images.flatten(1).float()
    pairs = list(itertools.combinations(range(len(flat)), 2))
    if not pairs:
        return 0.0
    return float(torch.stack([(flat[i] - flat[j]).pow(2).mean().sqrt() for i, j in pairs]).mean())


class CaptionColourAgreement(L.Callback):
    """After each validation and at test end: ``{stage}/colour_match_{en,ko}`` and ``{stage}/diversity*``."""

    def __init__(self, num_per_caption: int = 16, seed: int = 0, image_size: int = 64):
        super().__init__()
        self.num_per_caption = num_per_caption
        self.seed = seed
        self.scenes = colour_caption_set()
        self.stages: set[str] = set()
        # Real drawings of each caption, rendered once: the diversity a generator should reach.
        self.real_diversity = sum(
            mean_pairwise_distance(
                torch.stack([pil_to_tensor(im).float() / 255 for im in s.render(num_per_caption, image_size)])
            )
            for s in self.scenes
        ) / len(self.scenes)

    @torch.no_grad()
    def measure(self, text_to_image) -> dict[str, float]:
        scores = {}
        diversities = []
        for language in ("en", "ko"):
            captions = [getattr(scene, "english" if language == "en" else "korean") for scene in self.scenes]
            images = text_to_image(captions, self.num_per_caption, self.seed)
            matches = [
                dominant_colour(to_pil(image)) == scene.scene.colour
                for scene, row in zip(self.scenes, images, strict=True)
                for image in row
            ]
            scores[f"colour_match_{language}"] = sum(matches) / len(matches)
            diversities += [mean_pairwise_distance(row) for row in images]
        scores["diversity"] = sum(diversities) / len(diversities)
        scores["diversity_ratio"] = scores["diversity"] / self.real_diversity
        return scores

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:  # a curve over training: does caption-following grow with it?
            self._log(pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._log(pl_module, "test")

    def references(self, stage: str = "test") -> dict[str, dict[str, float]]:
        """Chance colour match (1/8) and the diversity of real drawings, for reports."""
        if stage not in self.stages:
            return {}
        chance = 1 / len(COLOURS)
        return {
            "chance": {f"{stage}/colour_match_en": chance, f"{stage}/colour_match_ko": chance},
            "real images": {f"{stage}/diversity": self.real_diversity, f"{stage}/diversity_ratio": 1.0},
        }

    def _log(self, pl_module: L.LightningModule, stage: str) -> None:
        self.stages.add(stage)
        for name, value in self.measure(text_to_image_for(pl_module)).items():
            pl_module.log(f"{stage}/{name}", value, sync_dist=True)
