"""Does a text-to-image model draw what its prompt names? Checked by judges that are not the generator.

For captions of random scenes of the shapes dataset, the model draws a few images each. Colour is judged by the
pixels (the named colour must dominate the non-background pixels, see ``synthetic.dominant_colour``; chance 1/8),
and so is the background (the named one must dominate the border pixels); shape by the shape judge, a classifier
trained on the dataset's real drawings (``src/demo/shape_judge.py``): of the 10 shapes a prompt can name, the one
it finds most likely must be the prompt's (chance 1/10). The same judging of real drawings of the prompts is the
ceiling, logged beside each number (``test/shape_match_real``) and tabled beside chance.

Beside what the model draws, what it has learnt to read: for a module with a denoising loss, how much that loss
on the real drawings rises when one attribute of their prompt is swapped (``test/loss_rise_kind``, ``_colour``,
``_background``; 0.03 = 3 % higher, the same noise and timesteps for both captions). An attribute the loss barely
rises for is one the model does not yet use, whatever its drawings happen to show.
"""

from __future__ import annotations

import random

import lightning as L
import torch

from src.demo.synthetic import (
    BACKGROUNDS,
    COLOURS,
    KINDS,
    STYLES,
    caption_scene,
    captions_with_one_change,
    dominant_background,
    dominant_colour,
    sample_scene,
)
from src.pipelines.loading import text_to_image_for
from src.utils.image_grid import captioned_grid, save_grid, to_pil
from src.utils.run import output_root

__all__ = ["PromptFollowing"]

# The attributes whose swap the loss probe measures.
SWAPPED_ATTRIBUTES = ("kind", "colour", "background")
# Draws of noise and timesteps per probe: 4 x (prompts x images) paired evaluations.
LOSS_PROBE_DRAWS = 4


class PromptFollowing(L.Callback):
    """At test end: ``test/colour_match``, ``test/shape_match``, ``test/both_match`` (colour and shape) and
    ``test/background_match`` of generated images,
    and ``prompt_following.png`` (the first ``grid_rows`` captions with their images) in the run directory."""

    def __init__(
        self,
        judge: str,
        num_prompts: int = 40,
        num_images_per_prompt: int = 4,
        num_inference_steps: int = 25,
        guidance_scale: float = 4.0,
        seed: int = 0,
        image_size: int = 32,
        grid_rows: int = 8,
    ) -> None:
        super().__init__()
        self.judge_name = judge
        self.num_images_per_prompt = num_images_per_prompt
        self.sampling = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale}
        self.seed = seed
        self.image_size = image_size
        self.grid_rows = grid_rows
        rng = random.Random(f"webtoon-lab/prompt-following/{seed}")
        self.prompts = []
        self.templates = []  # each caption's template, so that other languages can say the same
        for _ in range(num_prompts):
            scene, style = sample_scene(rng), rng.choice(STYLES)
            self.templates.append(rng.randrange(5))
            self.prompts.append((scene, style, caption_scene(scene, "en", self.templates[-1], style)))
        self.judge = None
        self.real: dict[str, float] = {}
        self.loss_rises: dict[str, float] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.judge is None:  # at once, so that a missing judge fails before training
            from src.metrics.classifier import load_classifier_judge

            self.judge = load_classifier_judge(self.judge_name, setting="callbacks.prompt_following.judge")

    def measure(self, images: torch.Tensor) -> dict[str, float]:
        """Shares of images [prompts, k, 3, H, W] in [0, 1] whose colour / shape / both match their prompt."""
        scenes = [scene for scene, _, _ in self.prompts for _ in range(images.shape[1])]
        flat = images.flatten(0, 1)
        pictures = [to_pil(image) for image in flat]
        colours = torch.tensor(
            [dominant_colour(p) == s.colour for p, s in zip(pictures, scenes, strict=True)]
        )
        backgrounds = torch.tensor(
            [dominant_background(p) == s.background for p, s in zip(pictures, scenes, strict=True)]
        )
        shapes = torch.tensor(
            [found == s.kind for found, s in zip(self.judge.predict(flat, among=KINDS), scenes, strict=True)]
        )
        return {
            "colour_match": colours.float().mean().item(),
            "shape_match": shapes.float().mean().item(),
            "both_match": (colours & shapes).float().mean().item(),
            "background_match": backgrounds.float().mean().item(),
        }

    def real_drawings(self) -> torch.Tensor:
        from src.demo.shape_judge import drawings_of

        scenes = [(scene, style) for scene, style, _ in self.prompts]
        return drawings_of(scenes, self.num_images_per_prompt, self.image_size, self.seed)

    def swapped_prompts(self, attribute: str) -> list[str]:
        """Each prompt with only ``attribute`` changed (to another value, the same for the same seed), worded
        with the same template and style."""
        rng = random.Random(f"webtoon-lab/prompt-following/{self.seed}/swap/{attribute}")
        described = [
            (scene, style, t) for (scene, style, _), t in zip(self.prompts, self.templates, strict=True)
        ]
        return captions_with_one_change(described, attribute, "en", rng)

    @torch.no_grad()
    def loss_rise(self, pl_module: L.LightningModule, drawings: torch.Tensor) -> dict[str, float]:
        """``loss_rise_<attribute>``: the module's denoising loss on ``drawings`` [prompts, k, 3, H, W] in [0, 1]
        with that attribute of each prompt swapped, over the loss with the right prompts, minus 1."""
        images = pl_module.preprocess.normalize(drawings.flatten(0, 1) * 255).to(pl_module.device)
        prompts = {"right": [caption for _, _, caption in self.prompts]}
        prompts |= {attribute: self.swapped_prompts(attribute) for attribute in SWAPPED_ATTRIBUTES}
        # One caption per drawing: each prompt's repeated for its drawings.
        variants = {
            name: [c for c in captions for _ in range(drawings.shape[1])]
            for name, captions in prompts.items()
        }
        losses = dict.fromkeys(variants, 0.0)
        for draw in range(LOSS_PROBE_DRAWS):
            for name, captions in variants.items():
                # The same noise and timesteps for every variant of the prompts.
                generator = torch.Generator().manual_seed(self.seed * 1000 + draw)
                losses[name] += float(pl_module.denoising_loss(images, captions, generator=generator))
        return {f"loss_rise_{name}": losses[name] / losses["right"] - 1 for name in SWAPPED_ATTRIBUTES}

    @torch.no_grad()
    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        text_to_image = text_to_image_for(pl_module, **self.sampling)
        images = text_to_image(
            [caption for _, _, caption in self.prompts], self.num_images_per_prompt, self.seed
        )
        real_drawings = self.real_drawings()
        self.real = {f"test/{name}": value for name, value in self.measure(real_drawings).items()}
        for name, value in self.measure(images).items():
            pl_module.log(f"test/{name}", value)
            pl_module.log(f"test/{name}_real", self.real[f"test/{name}"])
        if hasattr(pl_module, "denoising_loss"):
            self.loss_rises = self.loss_rise(pl_module, real_drawings)
            for name, value in self.loss_rises.items():
                pl_module.log(f"test/{name}", value)
        if trainer.is_global_zero:
            rows = self.prompts[: self.grid_rows]
            grid = captioned_grid(
                list(images[: len(rows)]), [caption for _, _, caption in rows], cell_size=96
            )
            save_grid(grid, output_root(trainer) / "prompt_following.png")

    def references(self, stage: str = "test") -> dict[str, dict[str, float]]:
        if stage != "test" or not self.real:
            return {}
        chance = {"test/colour_match": 1 / len(COLOURS), "test/shape_match": 1 / len(KINDS)}
        chance["test/both_match"] = chance["test/colour_match"] * chance["test/shape_match"]
        chance["test/background_match"] = 1 / len(BACKGROUNDS)
        return {"chance": chance, "real drawings": dict(self.real)}

    def report_notes(self) -> list[str]:
        notes = [
            f"Shape is judged by the classifier at {self.judge_name} (the most likely of the {len(KINDS)} shapes a "
            "prompt can name); colour and background by pixels. 'real drawings' is the same judging of the "
            "dataset's own drawings of these prompts (also logged as test/*_real)."
        ]
        if self.loss_rises:
            notes.append(
                "test/loss_rise_*: how much the denoising loss on those real drawings rises when one attribute of "
                "their prompt is swapped (0.03 = 3 % higher; near 0: the model does not read that attribute)."
            )
        return notes
