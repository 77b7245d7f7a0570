"""Images brought to the size a diffusion model draws at."""

from __future__ import annotations

from typing import Any

from PIL import Image

__all__ = ["model_resolution", "resize_for_model"]


def model_resolution(diffusers_pipeline: Any) -> int:
    """The side, in pixels, of the images the pipeline's UNet was trained on (SD 1.5: 512; the demo base: 32)."""
    return int(diffusers_pipeline.unet.config.sample_size * diffusers_pipeline.vae_scale_factor)


def resize_for_model(image: Image.Image, side: int, multiple: int = 8) -> Image.Image:
    """``image`` with its shorter side at ``side``, the aspect ratio kept, both sides multiples of ``multiple``
    (what the VAE's downsampling needs)."""
    scale = side / min(image.size)
    size = tuple(max(multiple, round(length * scale / multiple) * multiple) for length in image.size)
    return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)
