"""A 4-sentence story -> 4 panels -> one vertical strip in the webtoon scroll format (thesis chapter V).

Each sentence becomes a panel as a treatment does (:mod:`src.pipelines.panel`): retrieve, then redraw with
depth-to-image. The thesis draws the panels independently from one shared seed and names the limit that follows:
no style holds across the panels. The options, compared on the same stories in ``docs/results.md``:

- ``none``: the shared seed only (the thesis);
- ``shared_attention``: training-free; in the UNet's up blocks every panel's self-attention also attends to the
  first panel's keys and values (StyleAligned / StoryDiffusion), the four panels drawn as one batch;
- ``ip_adapter``: every panel is also conditioned on one reference image (the first panel, or a style image)
  through an IP-Adapter. The depth-to-image pipeline has no IP-Adapter loader, so these panels are drawn by the
  image-to-image pipeline of a base model that has one (see :class:`IPAdapterPanels`);
- ``lora``: a style LoRA or textual inversion of the fine-tuning module, loaded into the panel model
  (``weights=``), drawing with the shared seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from src.pipelines.panel import Panel, TreatmentToPanel, language_of
from src.pipelines.shared_attention import shared_attention
from src.pipelines.stable_diffusion import step_callback
from src.pipelines.strip import vertical_strip
from src.pipelines.text_to_image import StepCallback, cpu_generators
from src.utils.image_grid import to_pil

__all__ = ["CONSISTENCY", "IPAdapterPanels", "StoryToStrip", "Strip"]

CONSISTENCY = ("none", "shared_attention", "ip_adapter", "lora")


@dataclass
class Strip:
    """A story's panels and the strip that shows them."""

    sentences: list[str]
    panels: list[Panel]
    image: Image.Image = field(repr=False)

    def record(self) -> dict[str, Any]:
        return {"sentences": self.sentences, "panels": [panel.record() for panel in self.panels]}


class StoryToStrip:
    """``strips = story_to_strip(stories, seed)``: one :class:`Strip` per story (a list of sentences)."""

    def __init__(
        self,
        panel_maker: TreatmentToPanel,
        consistency: str = "none",
        ip_adapter: IPAdapterPanels | None = None,
        panel_width: int = 384,
        gutter: int = 32,
        captions: bool = True,
        shared_blocks: Sequence[str] = ("up_blocks",),
        adain: bool = False,
    ) -> None:
        """``captions``: print each sentence under its panel. ``shared_blocks`` and ``adain``: where
        ``consistency=shared_attention`` shares self-attention, and whether it also normalises queries and keys
        to the first panel's (see :func:`~src.pipelines.shared_attention.shared_attention`)."""
        if consistency not in CONSISTENCY:
            raise ValueError(f"consistency must be one of {', '.join(CONSISTENCY)}, got {consistency!r}")
        if consistency == "ip_adapter" and ip_adapter is None:
            raise ValueError("consistency=ip_adapter needs an IP-Adapter (ip_adapter.model=...)")
        self.panel_maker = panel_maker
        self.consistency = consistency
        self.ip_adapter = ip_adapter
        self.layout = {"width": panel_width, "gutter": gutter}
        self.captions = captions
        self.shared = {"blocks": tuple(shared_blocks), "adain": adain}

    def describe(self) -> dict[str, Any]:
        return {
            **self.panel_maker.describe(),
            "consistency": self.consistency,
            "shared_attention": {**self.shared, "blocks": list(self.shared["blocks"])}
            if self.consistency == "shared_attention"
            else None,
            "ip_adapter": self.ip_adapter.describe() if self.ip_adapter else None,
            "strip": {**self.layout, "captions": self.captions},
        }

    @torch.no_grad()
    def __call__(
        self,
        stories: Sequence[Sequence[str]],
        seed: int = 0,
        translations: Sequence[Sequence[str | None]] | None = None,
        on_step: StepCallback | None = None,
    ) -> list[Strip]:
        """Every panel of every story is drawn from the noise of ``seed`` (the thesis' shared seed)."""
        strips = []
        for number, sentences in enumerate(stories):
            sentences = [str(s) for s in sentences]
            if len(sentences) < 2 or not all(s.strip() for s in sentences):
                raise ValueError(f"story {number} must have at least 2 non-empty sentences, got {sentences}")
            given = list(translations[number]) if translations else [None] * len(sentences)
            panels = self.draw_story(sentences, seed, given, on_step)
            pictures = [to_pil(panel.image) for panel in panels]
            image = vertical_strip(pictures, sentences if self.captions else None, **self.layout)
            strips.append(Strip(sentences, panels, image))
        return strips

    def draw_story(
        self, sentences: list[str], seed: int, translations: list[str | None], on_step: StepCallback | None
    ) -> list[Panel]:
        maker = self.panel_maker
        hits = [found[0] for found in maker.retrieve(sentences, top_k=1)]
        prompts = [
            maker.sd_prompt(s, hit, t) for s, hit, t in zip(sentences, hits, translations, strict=True)
        ]
        references = [maker.reference(hit) for hit in hits]
        seeds = [seed] * len(sentences)
        if self.consistency == "shared_attention":
            with shared_attention(maker.diffusers_pipeline.unet, len(sentences), **self.shared):
                images = maker.draw([p for p, _ in prompts], references, seeds, on_step)
        elif self.consistency == "ip_adapter":
            images = self.ip_adapter.draw([p for p, _ in prompts], references, seeds, maker, on_step)
        else:
            images = maker.draw([p for p, _ in prompts], references, seeds, on_step)
        return [
            Panel(
                treatment=sentence,
                language=language_of(sentence),
                hit=hit,
                captions_en=tuple(maker.index.rows[hit.row].captions_en),
                sd_prompt=prompt,
                prompt_from=reason,
                seed=seed,
                image=image,
            )
            for sentence, hit, (prompt, reason), image in zip(sentences, hits, prompts, images, strict=True)
        ]


class IPAdapterPanels:
    """Panels redrawn by an image-to-image pipeline with an IP-Adapter: every panel also sees one reference
    image (a style image, or else the story's first panel as the panel model draws it).

    ``diffusers_pipeline`` is a ``StableDiffusionImg2ImgPipeline`` (or any class with diffusers'
    ``IPAdapterMixin``) whose IP-Adapter is loaded; ``scale`` is ``set_ip_adapter_scale``'s (a float, or a
    per-block dict to inject style only, as InstantStyle does).
    """

    def __init__(
        self,
        diffusers_pipeline: Any,
        scale: float | dict = 0.6,
        style_image: Image.Image | None = None,
        source: dict[str, Any] | None = None,
    ) -> None:
        self.diffusers_pipeline = diffusers_pipeline
        self.scale = scale
        self.style_image = style_image
        self.source = dict(source or {})
        diffusers_pipeline.set_ip_adapter_scale(scale)

    def describe(self) -> dict[str, Any]:
        return {
            **self.source,
            "scale": self.scale,
            "reference": "first panel" if self.style_image is None else "style image",
        }

    def draw(
        self,
        prompts: list[str],
        images: list[Image.Image],
        seeds: list[int],
        panel_maker: TreatmentToPanel,
        on_step: StepCallback | None = None,
    ) -> torch.Tensor:
        """Redraw ``images`` with ``prompts`` in one batch, image ``i`` from the noise of ``seeds[i]``, all
        with the one reference image, sampling as ``panel_maker`` does -> [n, 3, H, W] in [0, 1]."""
        reference = self.style_image
        if reference is None:
            reference = to_pil(panel_maker.draw(prompts[:1], images[:1], seeds[:1])[0])
        settings = panel_maker.settings
        # The scale lives in the shared UNet's processors: set it for this draw, whoever used them last.
        self.diffusers_pipeline.set_ip_adapter_scale(self.scale)
        output = self.diffusers_pipeline(
            prompt=list(prompts),
            image=list(images),
            # one entry per loaded adapter (diffusers repeats its embedding over the batch), not one per panel
            ip_adapter_image=[reference],
            strength=settings.strength,
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            negative_prompt=[settings.negative_prompt] * len(prompts) if settings.negative_prompt else None,
            generator=[cpu_generators(s, 1)[0] for s in seeds],
            output_type="pt",
            callback_on_step_end=step_callback(on_step),
        )
        return output.images.float().cpu().clamp(0, 1)
