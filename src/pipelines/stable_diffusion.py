"""Prompts -> images with Stable Diffusion and a fine-tuning method's output, through vanilla diffusers.

Every method's export loads into an unmodified ``StableDiffusionPipeline`` the way its users load it:
LoRA with ``load_lora_weights`` (diffusers or kohya file), Textual Inversion with ``load_textual_inversion``
(diffusers or WebUI file), DreamBooth / full fine-tunes with ``from_pretrained`` of the exported directory, and
hypernetworks (which diffusers lacks) with this project's WebUI-compatible loader. ``generate.py``, the
fine-tuning validation grids and, later, the REST service generate through :class:`StableDiffusionGenerator`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from src.utils.hub import from_pretrained

__all__ = ["METHODS", "StableDiffusionGenerator", "load_pipeline"]

METHODS = ("base", "lora", "textual_inversion", "dreambooth", "full", "hypernetwork")
LORA_ADAPTER = "finetuned"


def read_export_record(weights: str | os.PathLike | None) -> dict[str, Any]:
    """``finetune.json`` of a training run's export (method, base model, prompt aliases), or ``{}``."""
    if not weights:
        return {}
    path = Path(weights)
    record = (path if path.is_dir() else path.parent) / "finetune.json"
    return json.loads(record.read_text()) if record.is_file() else {}


def load_pipeline(
    base_model: str | None = None,
    method: str | None = None,
    weights: str | os.PathLike | None = None,
    multiplier: float = 1.0,
    torch_dtype: torch.dtype | None = None,
) -> tuple[Any, dict[str, str]]:
    """A diffusers pipeline with ``method``'s output applied, and the prompt aliases it brings.

    ``weights``: the method's export (a directory or a file). A run's export directory records its method, base
    model and aliases (``finetune.json``), so ``weights`` alone is enough for it; files from elsewhere (a WebUI
    embedding, a kohya LoRA) need ``method`` and ``base_model``. ``multiplier``: LoRA / hypernetwork strength.
    The aliases map the paper's ``*`` to what the model learnt, so prompts read alike for all methods.
    """
    from diffusers import StableDiffusionPipeline

    record = read_export_record(weights)
    method = method or record.get("method") or "base"
    base_model = base_model or record.get("base_model")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method != "base" and not weights:
        raise ValueError(f"method={method} needs weights=<its export: a directory or file>")
    if method not in ("dreambooth", "full") and not base_model:
        raise ValueError(f"method={method} needs base_model=<the hub id or directory it was trained on>")
    options = {"safety_checker": None, "requires_safety_checker": False, "torch_dtype": torch_dtype}
    if method in ("dreambooth", "full"):
        pipeline = from_pretrained(
            StableDiffusionPipeline.from_pretrained, str(weights), "weights", **options
        )
    else:
        pipeline = from_pretrained(
            StableDiffusionPipeline.from_pretrained, base_model, "base_model", **options
        )
    pipeline.set_progress_bar_config(disable=True)
    aliases: dict[str, str] = dict(record.get("prompt_aliases") or {})
    if method == "lora":
        pipeline.load_lora_weights(str(weights), adapter_name=LORA_ADAPTER)
        pipeline.set_adapters([LORA_ADAPTER], adapter_weights=[float(multiplier)])
    elif method == "textual_inversion":
        token = _embedding_token(Path(weights))
        pipeline.load_textual_inversion(str(weights), token=token)
        aliases["*"] = token
    elif method == "hypernetwork":
        from src.modules.networks.hypernetwork import apply_hypernetwork, load_hypernetwork

        path = Path(weights)
        if path.is_dir():
            candidates = sorted(path.glob("*.pt"))
            if len(candidates) != 1:
                raise FileNotFoundError(f"weights={path} should hold exactly one hypernetwork .pt file")
            path = candidates[0]
        hypernetwork = load_hypernetwork(path).to(pipeline.device)
        apply_hypernetwork(pipeline.unet, hypernetwork, multiplier=multiplier)
    return pipeline, aliases


def _embedding_token(weights: Path) -> str:
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


class StableDiffusionGenerator:
    """``generator(prompts, num_images_per_prompt, seed)`` -> images [n, k, 3, H, W] in [0, 1].

    Image ``j`` of every prompt starts from the noise of ``seed + j``, so results differ between prompts (and
    between methods) only by the prompt and the weights.
    """

    def __init__(
        self,
        pipeline: Any,
        prompt_aliases: Mapping[str, str] | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        negative_prompt: str | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.prompt_aliases = dict(prompt_aliases or {})
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.negative_prompt = negative_prompt

    @classmethod
    def load(
        cls,
        base_model: str | None = None,
        method: str | None = None,
        weights: str | os.PathLike | None = None,
        multiplier: float = 1.0,
        device: str = "cpu",
        **settings: Any,
    ) -> StableDiffusionGenerator:
        dtype = torch.float16 if str(device).startswith("cuda") else None
        pipeline, aliases = load_pipeline(base_model, method, weights, multiplier, torch_dtype=dtype)
        return cls(pipeline.to(device), aliases, **settings)

    def prompt(self, text: str) -> str:
        for alias, token in self.prompt_aliases.items():
            text = text.replace(alias, token)
        return text

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], num_images_per_prompt: int = 1, seed: int = 0) -> torch.Tensor:
        rows = []
        for prompt in prompts:
            # CPU generators: the same noise on every device.
            generators = [
                torch.Generator(device="cpu").manual_seed(seed + j) for j in range(num_images_per_prompt)
            ]
            images = self.pipeline(
                [self.prompt(prompt)] * num_images_per_prompt,
                negative_prompt=[self.negative_prompt] * num_images_per_prompt
                if self.negative_prompt
                else None,
                num_inference_steps=self.num_inference_steps,
                guidance_scale=self.guidance_scale,
                generator=generators,
                output_type="pt",
            ).images
            rows.append(images.float().cpu().clamp(0, 1))
        return torch.stack(rows)
