"""A photo -> a webtoon image in a trained style: img2img steered by one or several ControlNets (seed 002).

The photo is noised to ``strength`` and redrawn from the prompt by a model with a style LoRA (or textual
inversion, or hypernetwork) loaded, while each ControlNet holds what its control image shows — the person's pose
(openpose), the scene's depth, its straight lines (MLSD), its edges (Canny) — with its own
``controlnet_conditioning_scale`` and the share of the denoising steps it acts on (``control_guidance_start`` /
``end``). Control images come from detectors (:mod:`src.pipelines.detectors`) or are given as files; they are
returned with the images, so a user sees what steered them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from PIL import Image

from src.pipelines.images import model_resolution, resize_for_model
from src.pipelines.stable_diffusion import step_callback
from src.pipelines.text_to_image import StepCallback, cpu_generators

__all__ = ["ControlSpec", "PhotoSettings", "PhotoToWebtoon"]


@dataclass(frozen=True)
class ControlSpec:
    """One ControlNet: its model (hub id or directory), where its control image comes from, and its strength."""

    model: str
    detector: str | None = None  # canny | openpose | mlsd | midas | depth; or give `image`
    image: str | None = None  # a control image file, used as it is (resized to the photo)
    scale: float = 1.0  # controlnet_conditioning_scale
    start: float = 0.0  # control_guidance_start: the share of steps before it acts
    end: float = 1.0  # control_guidance_end
    detector_weights: str | None = None  # hub id or directory of the detector's files (lllyasviel/Annotators)

    def __post_init__(self) -> None:
        for name in ("scale", "start", "end"):  # a number typed in quotes on the command line is still one
            object.__setattr__(self, name, float(getattr(self, name)))
        if (self.detector is None) == (self.image is None):
            raise ValueError(f"ControlNet {self.model}: give either a detector or a control image, not both.")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(
                f"ControlNet {self.model}: need 0 <= start < end <= 1, got {self.start}, {self.end}"
            )


@dataclass(frozen=True)
class PhotoSettings:
    strength: float = 0.75
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    negative_prompt: str | None = None
    resolution: int | None = None  # the photo's shorter side before redrawing; None: the model's own

    def __post_init__(self) -> None:
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")


class PhotoToWebtoon:
    """``images, controls = photo_to_webtoon(photo, prompt, num_images, seed)``: images [k, 3, H, W] in [0, 1],
    image ``j`` from the noise of ``seed + j``, and the control image of every ControlNet."""

    def __init__(
        self,
        diffusers_pipeline: Any,
        controls: Sequence[ControlSpec],
        detectors: Sequence[Callable[[Image.Image], Image.Image] | None],
        settings: PhotoSettings | None = None,
        prompt_aliases: dict[str, str] | None = None,
        source: dict[str, Any] | None = None,
    ) -> None:
        """``diffusers_pipeline``: a ``StableDiffusionControlNetImg2ImgPipeline`` whose nets are in the order of
        ``controls``; ``detectors[i]`` makes net ``i``'s control image (None: ``controls[i].image`` is given)."""
        if len(controls) != len(detectors) or not controls:
            raise ValueError("give one detector (or None) per ControlNet, and at least one ControlNet")
        self.diffusers_pipeline = diffusers_pipeline
        self.controls = list(controls)
        self.detectors = list(detectors)
        self.settings = settings or PhotoSettings()
        self.prompt_aliases = dict(prompt_aliases or {})
        self.source = dict(source or {})

    def describe(self) -> dict[str, Any]:
        return {
            **self.source,
            **asdict(self.settings),
            "controlnets": [asdict(c) for c in self.controls],
            "prompt_aliases": self.prompt_aliases,
        }

    def prepare(self, photo: Image.Image) -> Image.Image:
        """The photo at the size the model draws (shorter side ``resolution``, multiples of 8)."""
        return resize_for_model(photo, self.settings.resolution or model_resolution(self.diffusers_pipeline))

    def control_images(self, photo: Image.Image) -> list[Image.Image]:
        """Every ControlNet's control image for ``photo`` (already prepared), at its size."""
        from src.utils.images import decode_image

        images = []
        for spec, detect in zip(self.controls, self.detectors, strict=True):
            if detect is not None:
                images.append(detect(photo))
            else:
                given = decode_image(spec.image, name=f"control image of {spec.model}")
                images.append(given.resize(photo.size, Image.Resampling.BILINEAR))
        return images

    @torch.no_grad()
    def __call__(
        self,
        photo: Image.Image,
        prompt: str,
        num_images: int = 1,
        seed: int = 0,
        on_step: StepCallback | None = None,
    ) -> tuple[torch.Tensor, list[Image.Image]]:
        if not prompt.strip():
            raise ValueError("prompt must be a non-empty sentence.")
        photo = self.prepare(photo)
        controls = self.control_images(photo)
        for alias, token in self.prompt_aliases.items():
            prompt = prompt.replace(alias, token)
        settings, single = self.settings, len(self.controls) == 1
        output = self.diffusers_pipeline(
            prompt=[prompt] * num_images,
            image=photo,
            control_image=controls[0] if single else controls,
            strength=settings.strength,
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            negative_prompt=[settings.negative_prompt] * num_images if settings.negative_prompt else None,
            controlnet_conditioning_scale=self._per_net("scale", single),
            control_guidance_start=self._per_net("start", single),
            control_guidance_end=self._per_net("end", single),
            generator=cpu_generators(seed, num_images),
            output_type="pt",
            callback_on_step_end=step_callback(on_step),
        )
        return output.images.float().cpu().clamp(0, 1), controls

    def _per_net(self, name: str, single: bool) -> float | list[float]:
        values = [float(getattr(spec, name)) for spec in self.controls]
        return values[0] if single else values
