"""What the panel measurements need of the generated world: treatments written from held-out scenes, and a judge
of panels by their pixels.

A treatment is a caption of a test-split scene (which the index, built on the train split, never holds), in
English and in Korean, without the drawing style (a writer names what happens, not how it is drawn). The judge
knows the world's palette: the background is the colour most border pixels are nearest (chance 1/5), the shape's
colour the one most other pixels are nearest (chance 1/8), and the foreground every pixel not nearest the
background colour — the layout a panel keeps or loses.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from src.demo.synthetic import (
    BACKGROUNDS,
    COLOURS,
    NUM_TEMPLATES,
    caption_scene,
    dominant_background,
    dominant_colour,
    synthetic_scene,
)

__all__ = ["SceneJudge", "treatment_cases"]


def treatment_cases(num_cases: int = 40, seed: int = 0) -> list[dict]:
    """Treatments of test scenes ``0 .. num_cases - 1``, the caption templates in turn: ``{english, korean,
    expected}`` (what a faithful panel shows), the fields of ``src.benchmark.panels.TreatmentCase``."""
    cases = []
    for index in range(num_cases):
        scene, _, _ = synthetic_scene("test", index, seed)
        template = index % NUM_TEMPLATES
        cases.append(
            {
                "english": caption_scene(scene, "en", template),
                "korean": caption_scene(scene, "ko", template),
                "expected": {"colour": scene.colour, "background": scene.background},
            }
        )
    return cases


class SceneJudge:
    """Colour, background and foreground of a drawing of the generated world."""

    chance = {"colour": 1 / len(COLOURS), "background": 1 / len(BACKGROUNDS)}

    def attributes(self, image: Image.Image) -> dict[str, str | None]:
        return {"colour": dominant_colour(image), "background": dominant_background(image)}

    def foreground(self, image: Image.Image) -> np.ndarray:
        background = np.array(BACKGROUNDS[dominant_background(image)], dtype=np.float32)
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
        palette = np.array(list(COLOURS.values()) + list(BACKGROUNDS.values()), dtype=np.float32)
        nearest = palette[((pixels[..., None, :] - palette) ** 2).sum(-1).argmin(-1)]
        return (nearest != background).any(-1)
