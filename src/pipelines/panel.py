"""A writer's treatment -> a webtoon panel: retrieval-guided depth-to-image (thesis chapter V).

1. The project's bilingual CLIP encodes the treatment (English or Korean) and the image index returns the
   dataset images nearest to it (:mod:`src.retrieval`).
2. Stable Diffusion's depth-to-image model redraws the retrieved image: its depth map (estimated by the model's
   own depth estimator) keeps the layout, the prompt — the treatment and the style keyword ("webtoon") — sets
   what is drawn.

Stable Diffusion's text encoder reads English only. A Korean treatment therefore reaches it through the
retrieved image's English captions (``korean_prompt``: the first caption, all of them joined, or a translation
the caller gives), or, with ``korean="encoder"``, as it is, through a Korean text encoder distilled into the
model's text space (:mod:`src.modules.diffusion.korean_text_encoder`); each panel records which text was used
and why. ``use_depth=False`` draws the
same panels with the depth channel's input weights at zero — plain image-to-image with the same model — the
baseline that shows what depth adds.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from src.pipelines.images import model_resolution, resize_for_model
from src.pipelines.stable_diffusion import step_callback
from src.pipelines.text_to_image import StepCallback, cpu_generators
from src.retrieval.encoder import CLIPEncoder
from src.retrieval.index import ImageIndex, SearchHit

__all__ = ["KOREAN_PROMPTS", "Panel", "PanelSettings", "TreatmentToPanel", "language_of"]

HANGUL = re.compile("[\u1100-\u11ff\u3130-\u318f\uac00-\ud7a3]")
KOREAN_PROMPTS = ("first_caption", "all_captions", "translation")
KOREAN_READINGS = ("retrieved_captions", "encoder")


def language_of(text: str) -> str:
    """``"ko"`` when the text holds Hangul, else ``"en"``."""
    return "ko" if HANGUL.search(text) else "en"


@dataclass(frozen=True)
class PanelSettings:
    """How a panel is drawn; every field lands in the manifest."""

    style_keyword: str = "webtoon"  # appended to every Stable Diffusion prompt, as the thesis does
    strength: float = 0.8  # how far the retrieved image is noised before it is redrawn
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    negative_prompt: str | None = None
    top_k: int = 1  # panels per treatment: one per retrieved image, best first
    korean_prompt: str = "first_caption"  # first_caption | all_captions | translation
    korean: str = (
        "retrieved_captions"  # retrieved_captions | encoder (the pipeline's text encoder reads Korean)
    )
    use_depth: bool = True
    resolution: int | None = (
        None  # the retrieved image's shorter side before redrawing; None: the model's own
    )

    def __post_init__(self) -> None:
        if self.korean not in KOREAN_READINGS:
            raise ValueError(f"korean must be one of {', '.join(KOREAN_READINGS)}, got {self.korean!r}")
        if self.korean_prompt not in KOREAN_PROMPTS:
            raise ValueError(
                f"korean_prompt must be one of {', '.join(KOREAN_PROMPTS)}, got {self.korean_prompt!r}"
            )
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")


@dataclass
class Panel:
    """One drawn panel and everything needed to know how it came to be."""

    treatment: str
    language: str
    hit: SearchHit
    captions_en: tuple[str, ...]  # the retrieved image's English captions
    sd_prompt: str  # what Stable Diffusion was given
    prompt_from: str  # why: "treatment", "retrieved first English caption", ...
    seed: int
    image: torch.Tensor = field(repr=False)  # [3, H, W] in [0, 1]

    def record(self) -> dict[str, Any]:
        """The manifest's entry (without pixels)."""
        return {
            "treatment": self.treatment,
            "language": self.language,
            "retrieved": {"key": self.hit.key, "row": self.hit.row, "score": round(self.hit.score, 6)},
            "retrieved_captions_en": list(self.captions_en),
            "sd_prompt": self.sd_prompt,
            "prompt_from": self.prompt_from,
            "seed": self.seed,
        }


class TreatmentToPanel:
    """``panels = treatment_to_panel(treatments, seed)`` -> one list of ``top_k`` :class:`Panel` per treatment.

    Built by :func:`src.pipelines.loading.load_panel_maker` from a CLIP, an index and a depth-to-image model.
    """

    def __init__(
        self,
        encoder: CLIPEncoder,
        index: ImageIndex,
        diffusers_pipeline: Any,
        settings: PanelSettings | None = None,
        prompt_aliases: dict[str, str] | None = None,
        source: dict[str, Any] | None = None,
    ) -> None:
        """``diffusers_pipeline``: a ``StableDiffusionDepth2ImgPipeline``; ``source``: where the models came
        from, for manifests."""
        self.encoder = encoder
        self.index = index
        self.diffusers_pipeline = diffusers_pipeline
        self.settings = settings or PanelSettings()
        self.prompt_aliases = dict(prompt_aliases or {})
        self.source = dict(source or {})

    def describe(self) -> dict[str, Any]:
        """What a manifest records about the models and settings."""
        return {**self.source, **self.settings.__dict__, "prompt_aliases": self.prompt_aliases}

    # --- 1. retrieval --------------------------------------------------------------------------------------

    def retrieve(self, treatments: Sequence[str], top_k: int | None = None) -> list[list[SearchHit]]:
        """The ``top_k`` nearest dataset images of each treatment, best first."""
        return self.index.search_texts(self.encoder, list(treatments), top_k or self.settings.top_k)

    # --- 2. the prompt Stable Diffusion reads ------------------------------------------------------------------

    def sd_prompt(self, treatment: str, hit: SearchHit, translation: str | None = None) -> tuple[str, str]:
        """The prompt for ``treatment`` (+ the style keyword) and where its words came from."""
        if language_of(treatment) == "en":
            text, reason = treatment, "treatment"
        elif self.settings.korean == "encoder":
            text, reason = treatment, "treatment (Korean, read by the Korean text encoder)"
        elif self.settings.korean_prompt == "translation":
            if not translation:
                raise ValueError(
                    f"korean_prompt=translation needs a translation for the Korean treatment {treatment!r}"
                )
            text, reason = translation, "given translation (the treatment is Korean)"
        else:
            captions = self.index.rows[hit.row].captions_en
            if not captions:
                raise ValueError(
                    f"The Korean treatment {treatment!r} retrieved {hit.key}, which has no English caption to "
                    "prompt Stable Diffusion with: give korean_prompt=translation and translations=[...]."
                )
            if self.settings.korean_prompt == "first_caption":
                text, reason = (
                    captions[0],
                    "retrieved image's first English caption (the treatment is Korean)",
                )
            else:
                text = " ".join(captions)
                reason = "retrieved image's English captions, joined (the treatment is Korean)"
        for alias, token in self.prompt_aliases.items():
            text = text.replace(alias, token)
        keyword = self.settings.style_keyword
        return (f"{text.rstrip(' .')}, {keyword}" if keyword else text), reason

    # --- 3. drawing ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        treatments: Sequence[str],
        seed: int = 0,
        translations: Sequence[str | None] | None = None,
        on_step: StepCallback | None = None,
    ) -> list[list[Panel]]:
        """Panel ``j`` of every treatment is the ``j``-th retrieved image redrawn from the noise of
        ``seed + j``."""
        if not treatments or not all(str(t).strip() for t in treatments):
            raise ValueError("treatments must be one or more non-empty sentences.")
        translations = list(translations or [None] * len(treatments))
        if len(translations) != len(treatments):
            raise ValueError(f"{len(translations)} translations for {len(treatments)} treatments")
        hits = self.retrieve(treatments)
        plans = []
        for treatment, found, translation in zip(treatments, hits, translations, strict=True):
            for j, hit in enumerate(found):
                plans.append((treatment, hit, *self.sd_prompt(treatment, hit, translation), seed + j))
        images = self.draw(
            prompts=[plan[2] for plan in plans],
            images=[self.reference(plan[1]) for plan in plans],
            seeds=[plan[4] for plan in plans],
            on_step=on_step,
        )
        panels = [
            Panel(
                treatment=treatment,
                language=language_of(treatment),
                hit=hit,
                captions_en=tuple(self.index.rows[hit.row].captions_en),
                sd_prompt=prompt,
                prompt_from=reason,
                seed=panel_seed,
                image=image,
            )
            for (treatment, hit, prompt, reason, panel_seed), image in zip(plans, images, strict=True)
        ]
        per_treatment = len(panels) // len(treatments)
        return [panels[i : i + per_treatment] for i in range(0, len(panels), per_treatment)]

    def reference(self, hit: SearchHit) -> Image.Image:
        """The retrieved image at the size the model draws: its shorter side at ``resolution`` (by default the
        size the UNet was trained at), both sides multiples of 8, the aspect ratio kept."""
        side = self.settings.resolution or model_resolution(self.diffusers_pipeline)
        return resize_for_model(self.index.image(hit.row), side)

    def draw(
        self,
        prompts: Sequence[str],
        images: Sequence[Any],
        seeds: Sequence[int],
        on_step: StepCallback | None = None,
    ) -> torch.Tensor:
        """Redraw ``images`` (PIL) with ``prompts`` in one batch, image ``i`` from the noise of ``seeds[i]``
        -> [n, 3, H, W] in [0, 1]. One batch, so that attention shared across a story's panels sees them all."""
        settings = self.settings
        generators = [cpu_generators(s, 1)[0] for s in seeds]
        with self.depth_channel(enabled=settings.use_depth):
            output = self.diffusers_pipeline(
                prompt=list(prompts),
                image=list(images),
                strength=settings.strength,
                num_inference_steps=settings.num_inference_steps,
                guidance_scale=settings.guidance_scale,
                negative_prompt=[settings.negative_prompt] * len(prompts)
                if settings.negative_prompt
                else None,
                generator=generators,
                output_type="pt",
                callback_on_step_end=step_callback(on_step),
            )
        return output.images.float().cpu().clamp(0, 1)

    @contextlib.contextmanager
    def depth_channel(self, enabled: bool = True) -> Iterator[None]:
        """With ``enabled=False`` the UNet's depth input channel is cut (its weights zeroed) for the duration."""
        if enabled:
            yield
            return
        conv_in = self.diffusers_pipeline.unet.conv_in
        depth_weights = conv_in.weight[:, 4:].detach().clone()
        with torch.no_grad():
            conv_in.weight[:, 4:] = 0
        try:
            yield
        finally:
            with torch.no_grad():
                conv_in.weight[:, 4:] = depth_weights
