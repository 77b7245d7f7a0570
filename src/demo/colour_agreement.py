"""Does a generated image follow its caption? On the synthetic dataset the caption names the shape's colour,
so the share of images whose dominant colour is the named one measures it, per language (chance = 1/8)."""

from __future__ import annotations

import os

import lightning as L
import torch
from torchvision.transforms.functional import to_pil_image

from src.data.synthetic import COLOURS, colour_caption_set, dominant_colour


class CaptionColourAgreement(L.Callback):
    """After each validation and at test end: generate ``num_per_caption`` images per fixed caption and log ``test/colour_match_{en,ko}``."""

    def __init__(self, features_dir: str | os.PathLike, num_per_caption: int = 16, seed: int = 0):
        super().__init__()
        self.features_dir = features_dir
        self.num_per_caption = num_per_caption
        self.seed = seed

    @torch.no_grad()
    def colour_match(self, pl_module: L.LightningModule) -> dict[str, float]:
        from src.data.text_features import load_text_encoder_from_features

        encoder = load_text_encoder_from_features(self.features_dir)
        triples = colour_caption_set()
        scores = {}
        for language, column in (("en", 1), ("ko", 2)):
            vectors = encoder.encode([t[column] for t in triples]).to(pl_module.device)
            vectors = vectors.repeat_interleave(self.num_per_caption, dim=0)
            generator = torch.Generator().manual_seed(self.seed)
            images = pl_module.generate(vectors, generator=generator).float().cpu()
            expected = [t[0] for t in triples for _ in range(self.num_per_caption)]
            found = [dominant_colour(to_pil_image((image + 1) / 2)) for image in images]
            scores[f"colour_match_{language}"] = sum(
                f == e for f, e in zip(found, expected, strict=True)
            ) / len(found)
        scores["colour_match_chance"] = 1 / len(COLOURS)
        return scores

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:  # a curve over training: does caption-following grow with it?
            self._log(pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._log(pl_module, "test")

    def _log(self, pl_module: L.LightningModule, stage: str) -> None:
        for name, value in self.colour_match(pl_module).items():
            pl_module.log(f"{stage}/{name}", value, sync_dist=True)
