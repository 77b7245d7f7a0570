"""Every kind the service offers, loaded once per device through :mod:`src.pipelines.loading`, and how a job
draws with it.

A kind is offered when its models load; one that does not (a missing directory, a weight the hub cannot give)
is logged with the loader's one-line reason and the settings' hint, and the others are served. Each configured
style is the kind's model with that style's export applied, loaded as its own copy (diffusers would stack a
second LoRA on the first under one adapter name). A job's own settings (steps, strength, size, ControlNet
scales) make a light copy of the loaded maker that shares its weights: nothing is loaded per job.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from PIL import Image

from src.pipelines.text_to_image import StepCallback
from src.service.settings import KINDS, ServiceSettings
from src.utils.cli import USER_ERRORS, describe
from src.utils.image_grid import to_pil

__all__ = ["Drawing", "DrawnImage", "LoadedKinds", "load_kinds"]

log = logging.getLogger(__name__)


@dataclass
class DrawnImage:
    role: str  # image, control, input, panel, retrieved, strip
    image: Image.Image
    record: dict[str, Any] = field(default_factory=dict)


@dataclass
class Drawing:
    """What a job drew and the settings that redraw it."""

    images: list[DrawnImage]
    settings: dict[str, Any]


def _given(**values: Any) -> dict[str, Any]:
    """The job's own values (None: keep the loaded default)."""
    return {name: value for name, value in values.items() if value is not None}


def _some_steps_left(defaults: dict[str, Any], job: Any) -> None:
    """Redrawing runs ``int(steps * strength)`` steps (diffusers' rule); none left fails deep inside diffusers."""
    steps, strength = job.steps or defaults["steps"], job.strength or defaults["strength"]
    if int(steps * strength) < 1:
        raise ValueError(f"strength {strength} x steps {steps} leaves no denoising step: raise either")


# --- the four kinds: check(job) before it is queued, draw(job, on_step, photo) in a worker -------------------


class TextToImageKind:
    """txt2img: ``TextToImage`` per style."""

    def __init__(self, by_style: dict[str, Any]) -> None:
        self.by_style = by_style

    def defaults(self) -> dict[str, Any]:
        settings = self.by_style["none"].settings
        return {
            "steps": settings.get("num_inference_steps"),
            "guidance_scale": settings.get("guidance_scale"),
        }

    def check(self, job: Any) -> None:
        from src.pipelines.stable_diffusion import StableDiffusionTextToImage

        sampling = (job.steps, job.guidance_scale, job.negative_prompt)
        if not isinstance(self.by_style[job.style], StableDiffusionTextToImage) and any(sampling):
            raise ValueError("this model draws in one pass: leave steps, guidance_scale, negative_prompt out")

    def draw(self, job: Any, on_step: StepCallback, photo: Image.Image | None = None) -> Drawing:
        text_to_image = self.for_job(job)
        images = text_to_image([job.prompt], job.num_images, job.seed, on_step)[0]
        settings = {**text_to_image.settings, "seed": job.seed, "num_images": job.num_images}
        drawn = [DrawnImage("image", to_pil(image), {"seed": job.seed + j}) for j, image in enumerate(images)]
        return Drawing(drawn, settings)

    def for_job(self, job: Any) -> Any:
        from src.pipelines.stable_diffusion import StableDiffusionTextToImage

        loaded = self.by_style[job.style]
        own = _given(
            num_inference_steps=job.steps,
            guidance_scale=job.guidance_scale,
            negative_prompt=job.negative_prompt,
        )
        if not own or not isinstance(loaded, StableDiffusionTextToImage):
            return loaded
        sampling = {
            "num_inference_steps": loaded.num_inference_steps,
            "guidance_scale": loaded.guidance_scale,
            "negative_prompt": loaded.negative_prompt,
            **own,
        }
        return StableDiffusionTextToImage(
            loaded.diffusers_pipeline, loaded.prompt_aliases, source=loaded.source, **sampling
        )


class PhotoKind:
    """img2img: ``PhotoToWebtoon`` per style, its ControlNets by the configured names."""

    def __init__(self, by_style: dict[str, Any], controlnet_names: list[str]) -> None:
        self.by_style = by_style
        self.controlnet_names = controlnet_names

    def defaults(self) -> dict[str, Any]:
        maker = self.by_style["none"]
        return {
            "steps": maker.settings.num_inference_steps,
            "guidance_scale": maker.settings.guidance_scale,
            "strength": maker.settings.strength,
            "size": maker.settings.resolution,
            "controlnets": {n: c.scale for n, c in zip(self.controlnet_names, maker.controls, strict=True)},
        }

    def check(self, job: Any) -> None:
        _some_steps_left(self.defaults(), job)

    def draw(self, job: Any, on_step: StepCallback, photo: Image.Image | None = None) -> Drawing:
        from src.pipelines.photo import PhotoToWebtoon

        if photo is None:
            raise ValueError("img2img needs a photo: upload it (POST /v1/uploads) and give its id as photo")
        loaded = self.by_style[job.style]
        controls = loaded.controls
        if job.controlnets is not None:  # the nets a job does not name act at scale 0
            controls = [
                replace(spec, scale=float(job.controlnets.get(name, 0.0)))
                for name, spec in zip(self.controlnet_names, controls, strict=True)
            ]
        own = _given(
            strength=job.strength,
            num_inference_steps=job.steps,
            guidance_scale=job.guidance_scale,
            negative_prompt=job.negative_prompt,
            resolution=job.size,
        )
        maker = PhotoToWebtoon(
            loaded.diffusers_pipeline,
            controls,
            loaded.detectors,
            replace(loaded.settings, **own),
            loaded.prompt_aliases,
            loaded.source,
        )
        images, control_images = maker(photo, job.prompt, job.num_images, job.seed, on_step)
        names = self.controlnet_names
        drawn = [
            DrawnImage("input", maker.prepare(photo)),
            *(
                DrawnImage("control", c, {"controlnet": n})
                for n, c in zip(names, control_images, strict=True)
            ),
            *(DrawnImage("image", to_pil(image), {"seed": job.seed + j}) for j, image in enumerate(images)),
        ]
        settings = {
            **maker.describe(),
            "controlnet_names": names,
            "seed": job.seed,
            "num_images": job.num_images,
        }
        return Drawing(drawn, settings)


class PanelKind:
    """panel: ``TreatmentToPanel`` per style."""

    def __init__(self, by_style: dict[str, Any]) -> None:
        self.by_style = by_style

    def defaults(self) -> dict[str, Any]:
        settings = self.by_style["none"].settings
        return {
            "steps": settings.num_inference_steps,
            "guidance_scale": settings.guidance_scale,
            "strength": settings.strength,
            "size": settings.resolution,
            "korean_prompt": settings.korean_prompt,
        }

    def check(self, job: Any) -> None:
        _some_steps_left(self.defaults(), job)

    def for_job(self, job: Any, top_k: int | None = None, translated: bool = False) -> Any:
        """The loaded maker with the job's settings, sharing its models."""
        from src.pipelines.panel import TreatmentToPanel

        loaded = self.by_style[job.style]
        own = _given(
            strength=job.strength,
            num_inference_steps=job.steps,
            guidance_scale=job.guidance_scale,
            negative_prompt=job.negative_prompt,
            resolution=job.size,
            top_k=top_k,
            korean_prompt="translation" if translated else None,
        )
        return TreatmentToPanel(
            loaded.encoder,
            loaded.index,
            loaded.diffusers_pipeline,
            replace(loaded.settings, **own),
            loaded.prompt_aliases,
            loaded.source,
        )

    def draw(self, job: Any, on_step: StepCallback, photo: Image.Image | None = None) -> Drawing:
        maker = self.for_job(job, top_k=job.num_images, translated=job.translation is not None)
        translations = [job.translation] if job.translation is not None else None
        panels = maker([job.treatment], job.seed, translations, on_step)[0]
        drawn = []
        for panel in panels:
            drawn.append(DrawnImage("panel", to_pil(panel.image), panel.record()))
            drawn.append(DrawnImage("retrieved", maker.index.image(panel.hit.row), {"key": panel.hit.key}))
        return Drawing(drawn, {**maker.describe(), "seed": job.seed})


class StoryKind:
    """story: ``StoryToStrip`` per style, on the panel kind's makers."""

    def __init__(self, by_style: dict[str, Any], panels: PanelKind) -> None:
        self.by_style = by_style
        self.panels = panels

    def defaults(self) -> dict[str, Any]:
        return {**self.panels.defaults(), "consistency": self.by_style["none"].consistency}

    def check(self, job: Any) -> None:
        _some_steps_left(self.defaults(), job)
        if job.translations is not None and len(job.translations) != len(job.story):
            raise ValueError(
                f"{len(job.translations)} translations for a story of {len(job.story)} sentences"
            )

    def draw(self, job: Any, on_step: StepCallback, photo: Image.Image | None = None) -> Drawing:
        from src.pipelines.story import StoryToStrip

        loaded = self.by_style[job.style]
        translated = job.translations is not None
        maker = StoryToStrip(
            self.panels.for_job(job, translated=translated),
            job.consistency or loaded.consistency,
            loaded.ip_adapter,
            panel_width=loaded.layout["width"],
            gutter=loaded.layout["gutter"],
            captions=loaded.captions,
        )
        strip = maker([job.story], job.seed, [job.translations] if translated else None, on_step)[0]
        drawn = [DrawnImage("strip", strip.image, {"sentences": strip.sentences})]
        drawn += [DrawnImage("panel", to_pil(panel.image), panel.record()) for panel in strip.panels]
        return Drawing(drawn, {**maker.describe(), "seed": job.seed})


# --- loading ----------------------------------------------------------------------------------------------------


@dataclass
class LoadedKinds:
    """The kinds that loaded on one device, and why each of the others did not."""

    device: str
    kinds: dict[str, Any]
    unavailable: dict[str, str]

    def styles(self, kind: str) -> list[str]:
        return list(self.kinds[kind].by_style)


def load_kinds(settings: ServiceSettings, device: str) -> LoadedKinds:
    """Load every configured kind (and each style of it) on ``device``; a kind that fails is left out, logged."""
    kinds: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    for kind in KINDS:
        section = settings.kind(kind)
        if section is None:
            unavailable[kind] = f"not configured (set {kind}: in configs/serve.yaml)"
            continue
        if kind == "story" and "panel" not in kinds:
            unavailable[kind] = "a story is drawn by the panel models: " + unavailable.get(
                "panel", "panel is off"
            )
            continue
        by_style: dict[str, Any] = {}
        for style in ["none", *settings.styles]:
            try:
                by_style[style] = _LOADERS[kind](section, settings, style, device, kinds)
            except Exception as error:  # one kind or style that fails must not take the others down
                reason = (
                    describe(error) if isinstance(error, USER_ERRORS) else f"{type(error).__name__}: {error}"
                )
                if not isinstance(error, USER_ERRORS):
                    log.exception("loading %s (style %s) failed", kind, style)
                if style == "none":
                    hint = settings.hint(kind)
                    where = f"(the settings it names are under `{kind}:` in configs/serve.yaml)"
                    unavailable[kind] = f"{reason} {where}" + (f" To offer {kind}: {hint}" if hint else "")
                    log.warning("%s not offered on %s: %s", kind, device, unavailable[kind])
                    break
                log.warning("style %s not offered for %s: %s", style, kind, reason)
        if "none" in by_style:
            kinds[kind] = _kind(kind, by_style, section, kinds)
            log.info("%s offered on %s (styles: %s)", kind, device, ", ".join(by_style))
    return LoadedKinds(device, kinds, unavailable)


def _with_style(section: dict[str, Any], settings: ServiceSettings, style: str) -> dict[str, Any]:
    if style == "none":
        return dict(section)
    return {**section, **settings.styles[style].model_dump()}


def _load_txt2img(
    section: dict[str, Any], settings: ServiceSettings, style: str, device: str, loaded: dict[str, Any]
) -> Any:
    from src.pipelines.loading import load_text_to_image

    if style != "none" and section.get("ckpt_path"):
        raise ValueError("styles apply to Stable Diffusion models, not to txt2img.ckpt_path")
    return load_text_to_image(**_with_style(section, settings, style), device=device)


def _load_img2img(
    section: dict[str, Any], settings: ServiceSettings, style: str, device: str, loaded: dict[str, Any]
) -> Any:
    from src.pipelines.loading import load_photo_maker

    options = _with_style(section, settings, style)
    controlnets = options.pop("controlnets", None) or {}
    if not isinstance(controlnets, dict) or not controlnets:
        raise ValueError(
            "img2img.controlnets needs at least one ControlNet by name: {canny: {model: ..., detector: canny}}"
        )
    return load_photo_maker(list(controlnets.values()), device=device, **options)


def _load_panel(
    section: dict[str, Any], settings: ServiceSettings, style: str, device: str, loaded: dict[str, Any]
) -> Any:
    from src.pipelines.loading import load_panel_maker

    return load_panel_maker(**_with_style(section, settings, style), device=device)


def _load_story(
    section: dict[str, Any], settings: ServiceSettings, style: str, device: str, loaded: dict[str, Any]
) -> Any:
    from src.pipelines.loading import load_story_maker

    if style not in loaded["panel"].by_style:
        raise ValueError(f"style {style} did not load for panel, on whose models stories are drawn")
    return load_story_maker(loaded["panel"].by_style[style], device=device, **section)


_LOADERS: dict[str, Callable[..., Any]] = {
    "txt2img": _load_txt2img,
    "img2img": _load_img2img,
    "panel": _load_panel,
    "story": _load_story,
}


def _kind(kind: str, by_style: dict[str, Any], section: dict[str, Any], loaded: dict[str, Any]) -> Any:
    if kind == "txt2img":
        return TextToImageKind(by_style)
    if kind == "img2img":
        return PhotoKind(by_style, list(section["controlnets"]))
    if kind == "panel":
        return PanelKind(by_style)
    return StoryKind(by_style, loaded["panel"])
