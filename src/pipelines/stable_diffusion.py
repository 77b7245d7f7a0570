"""Prompts -> images with Stable Diffusion, and a fine-tuning method's export applied the way its users apply it.

LoRA loads with ``load_lora_weights`` (diffusers or kohya file), Textual Inversion with ``load_textual_inversion``
(diffusers or WebUI file), DreamBooth / full fine-tunes are whole diffusers directories, and hypernetworks
(which diffusers lacks) go through this project's WebUI-compatible attention processors. Any diffusers pipeline
class with those loaders works (text-to-image, depth-to-image, ControlNet).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from src.pipelines.text_to_image import StepCallback, cpu_generators

__all__ = [
    "METHODS",
    "WHOLE_MODEL_METHODS",
    "StableDiffusionTextToImage",
    "apply_finetune",
    "read_export_record",
    "step_callback",
]

METHODS = ("base", "lora", "textual_inversion", "dreambooth", "full", "hypernetwork", "korean_text_encoder")
WHOLE_MODEL_METHODS = (
    "dreambooth",
    "full",
    "korean_text_encoder",
)  # their export is a whole diffusers directory
LORA_ADAPTER = "finetuned"
EXPORT_RECORD = "finetune.json"  # written beside every fine-tuning export (src/modules/diffusion/finetune.py)


def read_export_record(weights: str | os.PathLike | None) -> dict[str, Any]:
    """``finetune.json`` of a training run's export (method, base model, prompt aliases), or ``{}``."""
    if not weights:
        return {}
    path = Path(weights)
    record = (path if path.is_dir() else path.parent) / EXPORT_RECORD
    return json.loads(record.read_text()) if record.is_file() else {}


def apply_finetune(
    diffusers_pipeline: Any, method: str, weights: str | os.PathLike, multiplier: float = 1.0
) -> dict[str, str]:
    """Load ``method``'s ``weights`` into ``diffusers_pipeline`` in place; returns the prompt aliases it brings
    (textual inversion: ``*`` -> its token). ``multiplier``: LoRA / hypernetwork strength."""
    aliases: dict[str, str] = {}
    if method == "lora":
        diffusers_pipeline.load_lora_weights(str(weights), adapter_name=LORA_ADAPTER)
        diffusers_pipeline.set_adapters([LORA_ADAPTER], adapter_weights=[float(multiplier)])
    elif method == "textual_inversion":
        token = embedding_token(Path(weights))
        diffusers_pipeline.load_textual_inversion(str(weights), token=token)
        aliases["*"] = token
    elif method == "hypernetwork":
        from src.modules.networks.hypernetwork import apply_hypernetwork, load_hypernetwork

        hypernetwork = load_hypernetwork(hypernetwork_file(Path(weights)))
        apply_hypernetwork(diffusers_pipeline.unet, hypernetwork.to(diffusers_pipeline.device), multiplier)
    elif method not in ("base", *WHOLE_MODEL_METHODS):
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    return aliases


def hypernetwork_file(weights: Path) -> Path:
    if not weights.is_dir():
        return weights
    candidates = sorted(weights.glob("*.pt"))
    if len(candidates) != 1:
        raise FileNotFoundError(f"weights={weights} should hold exactly one hypernetwork .pt file")
    return candidates[0]


def embedding_token(weights: Path) -> str:
    """The word a textual-inversion file teaches: the key of diffusers' file, ``<name>`` for a WebUI file."""
    if weights.is_dir():
        weights = weights / "learned_embeds.safetensors"
    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as handle:
            keys = list(handle.keys())
        if len(keys) == 1 and keys[0] != "emb_params":
            return keys[0]
    return f"<{weights.stem}>"


def step_callback(on_step: StepCallback | None):
    """``on_step(done, total)`` as diffusers' ``callback_on_step_end``; ``None`` stays ``None``."""
    if on_step is None:
        return None

    def callback(diffusers_pipeline, step: int, timestep, tensors: dict) -> dict:
        on_step(step + 1, int(diffusers_pipeline.num_timesteps))
        return tensors

    return callback


class StableDiffusionTextToImage:
    """A diffusers text-to-image pipeline behind the project's contract (see :mod:`src.pipelines.text_to_image`).

    ``prompt_aliases`` rewrite prompts before encoding (textual inversion's ``*`` -> its token), so prompts read
    alike for all methods.
    """

    def __init__(
        self,
        diffusers_pipeline: Any,
        prompt_aliases: Mapping[str, str] | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        negative_prompt: str | None = None,
        source: Mapping[str, Any] | None = None,
    ) -> None:
        """``source``: where the weights came from (base model, method, weights), for manifests."""
        self.diffusers_pipeline = diffusers_pipeline
        self.prompt_aliases = dict(prompt_aliases or {})
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.negative_prompt = negative_prompt
        self.source = dict(source or {})

    @property
    def settings(self) -> dict[str, Any]:
        return {
            "model": "stable_diffusion",
            **self.source,
            "prompt_aliases": self.prompt_aliases,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "negative_prompt": self.negative_prompt,
        }

    def prompt(self, text: str) -> str:
        for alias, token in self.prompt_aliases.items():
            text = text.replace(alias, token)
        return text

    @torch.no_grad()
    def __call__(
        self,
        prompts: Sequence[str],
        num_images_per_prompt: int = 1,
        seed: int = 0,
        on_step: StepCallback | None = None,
    ) -> torch.Tensor:
        if not prompts:
            raise ValueError("Give at least one prompt.")
        rows = []
        for index, prompt in enumerate(prompts):
            count = num_images_per_prompt
            images = self.diffusers_pipeline(
                [self.prompt(prompt)] * count,
                negative_prompt=[self.negative_prompt] * count if self.negative_prompt else None,
                num_inference_steps=self.num_inference_steps,
                guidance_scale=self.guidance_scale,
                generator=cpu_generators(seed, count),
                output_type="pt",
                callback_on_step_end=step_callback(_part_of(on_step, index, len(prompts))),
            ).images
            rows.append(images.float().cpu().clamp(0, 1))
        return torch.stack(rows)


def _part_of(on_step: StepCallback | None, part: int, parts: int) -> StepCallback | None:
    """Progress of part ``part`` of ``parts`` equal runs, reported as progress of the whole."""
    if on_step is None:
        return None
    return lambda done, steps: on_step(part * steps + done, parts * steps)
