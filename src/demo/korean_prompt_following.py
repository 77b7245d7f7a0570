"""Does a Korean-taught text encoder draw from Korean prompts what the original draws from English ones?

The same random scenes as :class:`~src.demo.prompt_following.PromptFollowing`, each captioned in English and in
Korean by the same template, drawn four ways from the same noise and judged by the same judges:

- ``en``: English prompts through the checkpoint's own text encoder — the bar;
- ``ko``: Korean prompts through the student — what the student is for (the target: >= 0.9x the bar);
- ``en_student``: English prompts through the student — what English keeps (the target: within 5 % of the bar);
- ``ko_original``: Korean prompts through the original encoder — the floor, what the checkpoint did without it.

Logged as ``test/{colour,shape,both,background}_match_{reading}``, with the real drawings' ceiling and chance
as references, and ``korean_prompt_following.png``: English original | Korean student | Korean original.
"""

from __future__ import annotations

import lightning as L
import torch

from src.demo.prompt_following import PromptFollowing
from src.demo.synthetic import caption_scene
from src.pipelines.loading import diffusers_pipeline_of
from src.pipelines.stable_diffusion import StableDiffusionTextToImage
from src.utils.image_grid import captioned_grid, save_grid
from src.utils.run import output_root

__all__ = ["KoreanPromptFollowing"]

# reading -> (caption language, which text encoder reads it)
READINGS = {
    "en": ("en", "original"),
    "ko": ("ko", "student"),
    "en_student": ("en", "student"),
    "ko_original": ("ko", "original"),
}
GRID_COLUMNS = ("en", "ko", "ko_original")


class KoreanPromptFollowing(PromptFollowing):
    """For a module with ``diffusion_parts()`` (the student reading) and ``original_diffusion_parts()``."""

    def __init__(self, *args, grid_images: int = 2, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.grid_images = grid_images
        # the parent's scenes, each also captioned in Korean by its English caption's template
        self.captions = {
            language: [
                caption_scene(scene, language, template, style)
                for (scene, style, _), template in zip(self.prompts, self.templates, strict=True)
            ]
            for language in ("en", "ko")
        }

    def text_to_image(self, pl_module: L.LightningModule, encoder: str) -> StableDiffusionTextToImage:
        parts = pl_module.diffusion_parts() if encoder == "student" else pl_module.original_diffusion_parts()
        return StableDiffusionTextToImage(diffusers_pipeline_of(parts), **self.sampling)

    @torch.no_grad()
    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        drawers = {encoder: self.text_to_image(pl_module, encoder) for encoder in ("original", "student")}
        self.real = {f"test/{name}": value for name, value in self.measure(self.real_drawings()).items()}
        drawn = {}
        for reading, (language, encoder) in READINGS.items():
            drawn[reading] = drawers[encoder](self.captions[language], self.num_images_per_prompt, self.seed)
            for name, value in self.measure(drawn[reading]).items():
                pl_module.log(f"test/{name}_{reading}", value)
        for name, value in self.real.items():
            pl_module.log(f"{name}_real", value)
        if trainer.is_global_zero:
            rows = range(min(self.grid_rows, len(self.prompts)))
            cells = [
                [image for reading in GRID_COLUMNS for image in drawn[reading][row][: self.grid_images]]
                for row in rows
            ]
            titles = [
                title
                for title in ("English, original", "Korean, student", "Korean, original")
                for _ in range(self.grid_images)
            ]
            captions = [f"{self.captions['ko'][row]} / {self.captions['en'][row]}" for row in rows]
            grid = captioned_grid(cells, captions, column_titles=titles, cell_size=96, caption_width=320)
            save_grid(grid, output_root(trainer) / "korean_prompt_following.png")

    def references(self, stage: str = "test") -> dict[str, dict[str, float]]:
        references = super().references(stage)
        return {
            source: {f"{name}_{reading}": value for name, value in values.items() for reading in READINGS}
            for source, values in references.items()
        }

    def report_notes(self) -> list[str]:
        return [
            *super().report_notes(),
            "Readings: en = English prompts through the checkpoint's own text encoder (the bar); ko = Korean "
            "prompts through the distilled student; en_student = English through the student; ko_original = "
            "Korean through the original encoder (the floor).",
        ]
