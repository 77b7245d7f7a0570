"""The parts of a Stable Diffusion checkpoint, loaded the way diffusers' training examples load them.

A hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``, ``stabilityai/stable-diffusion-2-1``) or a local
diffusers directory (``save_pretrained`` output) both work. The training noise schedule is DDPM over the
checkpoint's own scheduler config, so its ``prediction_type`` (``epsilon`` for SD 1.x, ``v_prediction`` for
SD 2.x 768) decides the training target; the scheduler that ``model_index.json`` names (PNDM, DDIM, ...) is kept
for inference so that validation images look like the base model's. The text encoder and tokenizer are the
classes ``model_index.json`` names (CLIP for Stable Diffusion, AltCLIP's text tower for a Korean-taught copy).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from src.utils.hub import from_pretrained

__all__ = [
    "StableDiffusionComponents",
    "encode_text",
    "load_components",
    "load_text_encoder",
    "save_pipeline_directory",
]

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
    name_or_path: str, revision: str | None = None, variant: str | None = None, setting: str = SETTING
) -> StableDiffusionComponents:
    """Load every part of ``name_or_path``; a missing model fails once, naming the id and the setting."""
    import diffusers
    from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel

    name_or_path = str(name_or_path)
    options = {"revision": revision}
    model_index = from_pretrained(DiffusionPipeline.load_config, name_or_path, setting, **options)
    weights = {**options, "variant": variant}
    _, scheduler_class = model_index.get("scheduler", (None, "PNDMScheduler"))
    tokenizer, text_encoder = load_text_encoder(name_or_path, setting, revision, variant, model_index)
    return StableDiffusionComponents(
        name_or_path=name_or_path,
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=from_pretrained(AutoencoderKL.from_pretrained, name_or_path, setting, subfolder="vae", **weights),
        unet=from_pretrained(
            UNet2DConditionModel.from_pretrained, name_or_path, setting, subfolder="unet", **weights
        ),
        noise_scheduler=DDPMScheduler.from_pretrained(name_or_path, subfolder="scheduler", **options),
        inference_scheduler=getattr(diffusers, scheduler_class).from_pretrained(
            name_or_path, subfolder="scheduler", **options
        ),
    )


def load_text_encoder(
    name_or_path: str,
    setting: str = SETTING,
    revision: str | None = None,
    variant: str | None = None,
    model_index: dict[str, Any] | None = None,
) -> tuple[Any, Any]:
    """The tokenizer and text encoder of a pipeline directory, of the classes its ``model_index.json`` names."""
    import transformers
    from diffusers import DiffusionPipeline

    name_or_path = str(name_or_path)
    if model_index is None:
        model_index = from_pretrained(DiffusionPipeline.load_config, name_or_path, setting, revision=revision)
    tokenizer_class = getattr(transformers, model_index.get("tokenizer", (None, "CLIPTokenizer"))[1])
    text_encoder_class = getattr(transformers, model_index.get("text_encoder", (None, "CLIPTextModel"))[1])
    tokenizer = from_pretrained(
        tokenizer_class.from_pretrained, name_or_path, setting, subfolder="tokenizer", revision=revision
    )
    text_encoder = from_pretrained(
        text_encoder_class.from_pretrained,
        name_or_path,
        setting,
        subfolder="text_encoder",
        revision=revision,
        variant=variant,
    )
    return tokenizer, text_encoder


def encode_text(tokenizer: Any, text_encoder: Any, prompts: list[str]) -> Any:
    """The text encoder's output on ``prompts`` tokenized as diffusers' Stable Diffusion pipelines tokenize them
    (padded to the tokenizer's length, cut there, the attention mask passed only when the encoder's config sets
    ``use_attention_mask``): output 0 is the UNet's context, so training reads prompts as inference will."""
    tokens = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    device = text_encoder.device
    mask = (
        tokens.attention_mask.to(device)
        if getattr(text_encoder.config, "use_attention_mask", False)
        else None
    )
    return text_encoder(tokens.input_ids.to(device), attention_mask=mask)


def save_pipeline_directory(parts: dict[str, Any], out_dir: str | os.PathLike) -> Path:
    """Write ``parts`` (vae, text_encoder, tokenizer, unet, scheduler) as the directory that
    ``StableDiffusionPipeline.from_pretrained`` loads: the export format of whole models."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    ).save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)
