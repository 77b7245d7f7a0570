"""Does a generator follow its caption, and does it use its noise? Checks that only the shapes demo can make.

On the generated dataset a caption names the shape's colour and kind. Colour: the share of generated images whose
dominant colour is the named one, on two fixed scenes per colour (chance = 1/8). Shape: the share whose kind, by
the shape judge (a classifier of the dataset's real drawings, ``src/demo/shape_judge.py``), is the named one, on
random scenes of every kind (chance = 1/10), beside the same judging of real drawings of those scenes as the
ceiling (``{stage}/shape_match_real``). Both per language. Diversity is the mean pairwise pixel distance between
images drawn for one caption, beside the same for real drawings of that caption: a generator that ignores its
noise (GAN-CLS's mode collapse) scores ~0 against the real images' jitter.

For a GAN the test also asks its discriminator, which is what tells the generator to follow a caption, whether it
reads each attribute: ``test/d_ranks_kind`` (``_colour``, ``_background``) is the share of real drawings of the
shape scenes that it scores higher with their caption than with the same caption with that attribute swapped
(0.5 = blind to it). A generator is not asked for what its discriminator does not check.
"""

from __future__ import annotations

import itertools
import random

import lightning as L
import torch
from torchvision.transforms.functional import pil_to_tensor

from src.demo.prompt_following import SWAPPED_ATTRIBUTES
from src.demo.synthetic import (
    COLOURS,
    KINDS,
    STYLES,
    caption_scene,
    captions_with_one_change,
    colour_caption_set,
    dominant_colour,
    sample_scene,
)
from src.pipelines.loading import text_to_image_for
from src.utils.image_grid import to_pil

LANGUAGES = ("en", "ko")


def mean_pairwise_distance(images: torch.Tensor) -> float:
    """Mean root-mean-square pixel distance over all pairs of images [k, 3, H, W] in [0, 1]."""
    flat = images.flatten(1).float()
    pairs = list(itertools.combinations(range(len(flat)), 2))
    if not pairs:
        return 0.0
    return float(torch.stack([(flat[i] - flat[j]).pow(2).mean().sqrt() for i, j in pairs]).mean())


class CaptionFollowing(L.Callback):
    """After each validation and at test end: ``{stage}/colour_match_{en,ko}``, with a ``shape_judge``
    ``{stage}/shape_match_{en,ko}`` and ``{stage}/shape_match_real``, and ``{stage}/diversity*``."""

    def __init__(
        self,
        num_per_caption: int = 16,
        seed: int = 0,
        image_size: int = 64,
        shape_judge: str | None = None,
        num_shape_scenes: int = 40,
    ):
        super().__init__()
        self.num_per_caption = num_per_caption
        self.seed = seed
        self.image_size = image_size
        self.scenes = colour_caption_set()
        rng = random.Random(f"webtoon-lab/caption-following/{seed}")
        self.shape_scenes = []
        self.shape_templates = []
        for _ in range(num_shape_scenes):  # one scene, style and template, captioned in both languages
            scene, style, template = sample_scene(rng), rng.choice(STYLES), rng.randrange(5)
            self.shape_scenes.append(
                (scene, style, {lang: caption_scene(scene, lang, template, style) for lang in LANGUAGES})
            )
            self.shape_templates.append(template)
        self.shape_judge_name = shape_judge
        self.shape_judge = None
        self.real_shape_match: float | None = None
        self.stages: set[str] = set()
        self.discriminator_ranks: dict[str, float] = {}
        # Real drawings of each caption, rendered once: the diversity a generator should reach.
        self.real_diversity = sum(
            mean_pairwise_distance(
                torch.stack([pil_to_tensor(im).float() / 255 for im in s.render(num_per_caption, image_size)])
            )
            for s in self.scenes
        ) / len(self.scenes)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if (
            self.shape_judge_name and self.shape_judge is None
        ):  # at once: a missing judge fails before training
            from src.metrics.classifier import load_classifier_judge

            self.shape_judge = load_classifier_judge(
                self.shape_judge_name, setting="callbacks.caption_following.shape_judge"
            )
            self.real_shape_match = self.shape_match(self.real_drawings())

    def real_drawings(self) -> torch.Tensor:
        """[scenes, k, 3, H, W]: ``num_per_caption`` real drawings of each shape scene."""
        from src.demo.shape_judge import drawings_of

        scenes = [(scene, style) for scene, style, _ in self.shape_scenes]
        return drawings_of(scenes, self.num_per_caption, self.image_size, self.seed)

    def shape_match(self, images: torch.Tensor) -> float:
        """Share of images [scenes, k, 3, H, W] whose judged kind is their scene's, among the 10 kinds."""
        found = self.shape_judge.predict(images.flatten(0, 1), among=KINDS)
        wanted = [scene.kind for scene, _, _ in self.shape_scenes for _ in range(images.shape[1])]
        return sum(f == w for f, w in zip(found, wanted, strict=True)) / len(wanted)

    @torch.no_grad()
    def measure(self, text_to_image) -> dict[str, float]:
        scores = {}
        diversities = []
        for language in LANGUAGES:
            captions = [getattr(scene, "english" if language == "en" else "korean") for scene in self.scenes]
            images = text_to_image(captions, self.num_per_caption, self.seed)
            matches = [
                dominant_colour(to_pil(image)) == scene.scene.colour
                for scene, row in zip(self.scenes, images, strict=True)
                for image in row
            ]
            scores[f"colour_match_{language}"] = sum(matches) / len(matches)
            diversities += [mean_pairwise_distance(row) for row in images]
            if self.shape_judge is not None:
                shape_captions = [named[language] for _, _, named in self.shape_scenes]
                drawn = text_to_image(shape_captions, self.num_per_caption, self.seed)
                scores[f"shape_match_{language}"] = self.shape_match(drawn)
        if self.shape_judge is not None:
            scores["shape_match_real"] = self.real_shape_match
        scores["diversity"] = sum(diversities) / len(diversities)
        scores["diversity_ratio"] = scores["diversity"] / self.real_diversity
        return scores

    def swapped_captions(self, attribute: str, language: str) -> list[str]:
        """Each shape scene's caption with only ``attribute`` changed (the same for the same seed), worded with the
        same template and style."""
        rng = random.Random(f"webtoon-lab/caption-following/{self.seed}/swap/{attribute}")
        described = [
            (scene, style, t)
            for (scene, style, _), t in zip(self.shape_scenes, self.shape_templates, strict=True)
        ]
        return captions_with_one_change(described, attribute, language, rng)

    @torch.no_grad()
    def discriminator_ranking(self, pl_module: L.LightningModule) -> dict[str, float]:
        """``d_ranks_<attribute>``: the share of (real drawing, language) pairs that ``pl_module.match_logits``
        scores higher with the drawing's caption than with that attribute swapped, over both languages."""
        drawings = self.real_drawings()
        per_scene = drawings.shape[1]
        images = pl_module.preprocess.normalize(drawings.flatten(0, 1) * 255).to(pl_module.device)
        encode = text_to_image_for(pl_module).encode

        def logits(captions: list[str]) -> torch.Tensor:
            # Each scene's caption repeated for its drawings.
            return pl_module.match_logits(images, encode(captions).repeat_interleave(per_scene, dim=0))

        wins = dict.fromkeys(SWAPPED_ATTRIBUTES, 0.0)
        for language in LANGUAGES:
            right = logits([named[language] for _, _, named in self.shape_scenes])
            for attribute in SWAPPED_ATTRIBUTES:
                swapped = logits(self.swapped_captions(attribute, language))
                wins[attribute] += (right > swapped).float().mean().item() / len(LANGUAGES)
        return {f"d_ranks_{attribute}": value for attribute, value in wins.items()}

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:  # a curve over training: does caption-following grow with it?
            self._log(pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._log(pl_module, "test")
        if hasattr(pl_module, "match_logits"):
            self.discriminator_ranks = self.discriminator_ranking(pl_module)
            for name, value in self.discriminator_ranks.items():
                pl_module.log(f"test/{name}", value, sync_dist=True)

    def references(self, stage: str = "test") -> dict[str, dict[str, float]]:
        """Chance colour and shape match (1/8, 1/10), real drawings' diversity and shape match, for reports."""
        if stage not in self.stages:
            return {}
        chance = {f"{stage}/colour_match_{lang}": 1 / len(COLOURS) for lang in LANGUAGES}
        real = {f"{stage}/diversity": self.real_diversity, f"{stage}/diversity_ratio": 1.0}
        if self.shape_judge is not None:
            chance |= {f"{stage}/shape_match_{lang}": 1 / len(KINDS) for lang in LANGUAGES}
            real |= {f"{stage}/shape_match_{lang}": self.real_shape_match for lang in LANGUAGES}
        if stage == "test" and self.discriminator_ranks:
            chance |= {f"test/{name}": 0.5 for name in self.discriminator_ranks}
        return {"chance": chance, "real images": real}

    def report_notes(self) -> list[str]:
        if not self.discriminator_ranks:
            return []
        return [
            "test/d_ranks_*: the share of real drawings the discriminator scores higher with their caption than "
            "with one attribute of it swapped (0.5: it does not check that attribute, so the generator is not "
            "asked for it)."
        ]

    def _log(self, pl_module: L.LightningModule, stage: str) -> None:
        self.stages.add(stage)
        for name, value in self.measure(text_to_image_for(pl_module)).items():
            pl_module.log(f"{stage}/{name}", value, sync_dist=True)
