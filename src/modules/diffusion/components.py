"""The parts of a Stable Diffusion checkpoint, loaded the way diffusers' training examples load them.

A hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``, ``stabilityai/stable-diffusion-2-1``) or a local
diffusers directory (``save_pretrained`` output) both work. The training noise schedule is DDPM over the
checkpoint's own scheduler config, so its ``prediction_type`` (``epsilon`` for SD 1.x, ``v_prediction`` for
SD 2.x 768) decides the training target; the scheduler that ``model_index.json`` names (PNDM, DDIM, ...) is kept
for inference so that validation images look like the base model's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from src.utils.hub import from_pretrained

__all__ = ["StableDiffusionComponents", "load_components", "save_pipeline_directory"]

SETTING = "model.pretrained_model_name_or_path"


@dataclass
class StableDiffusionComponents:
    name_or_path: str
    tokenizer: Any  # CLIPTokenizer
    text_encoder: Any  # CLIPTextModel
    vae: Any  # AutoencoderKL
    unet: Any  # UNet2DConditionModel
    noise_scheduler: Any  # DDPMScheduler: adds noise during training
    inference_scheduler: Any  # the checkpoint's own sampler

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type


def load_components(
    name_or_path: str, revision: str | None = None, variant: str | None = None
) -> StableDiffusionComponents:
    """Load every part of ``name_or_path``; a missing model fails once, naming the id and the setting."""
    import diffusers
    from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    name_or_path = str(name_or_path)
    options = {"revision": revision}
    model_index = from_pretrained(DiffusionPipeline.load_config, name_or_path, SETTING, **options)
    weights = {**options, "variant": variant}
    _, scheduler_class = model_index.get("scheduler", (None, "PNDMScheduler"))
    return StableDiffusionComponents(
        name_or_path=name_or_path,
        tokenizer=from_pretrained(
            CLIPTokenizer.from_pretrained, name_or_path, SETTING, subfolder="tokenizer"
        ),
        text_encoder=from_pretrained(
            CLIPTextModel.from_pretrained, name_or_path, SETTING, subfolder="text_encoder", **weights
        ),
        vae=from_pretrained(AutoencoderKL.from_pretrained, name_or_path, SETTING, subfolder="vae", **weights),
        unet=from_pretrained(
            UNet2DConditionModel.from_pretrained, name_or_path, SETTING, subfolder="unet", **weights
        ),
        noise_scheduler=DDPMScheduler.from_pretrained(name_or_path, subfolder="scheduler", **options),
        inference_scheduler=getattr(diffusers, scheduler_class).from_pretrained(
            name_or_path, subfolder="scheduler", **options
        ),
    )


def save_pipeline_directory(parts: dict[str, Any], out_dir: str | os.PathLike) -> Path:
    """Write ``parts`` (vae, text_encoder, tokenizer, unet, scheduler) as the directory that
    ``StableDiffusionPipeline.from_pretrained`` loads: the export format of whole models."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    ).save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)
