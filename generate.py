"""Generate webtoon images for English / Korean captions with a trained model's pipeline: the text-to-webtoon
GAN from its checkpoint, or Stable Diffusion with a fine-tuning method's output.

Files are named after the caption's index (``000_0.png``), never its text, and ``manifest.json`` records the
settings and maps each file to its caption. See ``configs/generate.yaml``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

MANIFEST = "manifest.json"


def write_images(
    images, captions: Sequence[str], out_dir: str | os.PathLike, settings: dict[str, Any]
) -> dict[str, str]:
    """Write ``{index:03d}_{k}.png`` for images [n, k, 3, H, W] in [0, 1] and the manifest; returns file -> caption."""
    from src.utils.image_grid import to_pil

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    for index, (caption, row) in enumerate(zip(captions, images, strict=True)):
        for k, image in enumerate(row):
            name = f"{index:03d}_{k}.png"
            to_pil(image).save(out_dir / name)
            files[name] = caption
    manifest = {"settings": settings, "images": files}
    (out_dir / MANIFEST).write_text(
        json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return files


def generate_from_config(cfg: DictConfig) -> dict[str, str]:
    """Load the pipeline the config names, draw every caption, write the images and the manifest; returns
    file -> caption."""
    import torch
    from hydra.utils import to_absolute_path

    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    captions = [str(c) for c in cfg.captions] if OmegaConf.is_list(cfg.captions) else [str(cfg.captions)]
    if not captions or not all(c.strip() for c in captions):
        raise ValueError("captions must be one or more non-empty strings.")
    if cfg.ckpt_path:
        pipeline, settings = gan_pipeline(cfg, device)
    elif cfg.weights or cfg.base_model:
        pipeline, settings = stable_diffusion_pipeline(cfg, device)
    else:
        raise ValueError(
            "Say what generates: ckpt_path=<a GAN checkpoint of train.py>, or weights=<a fine-tuning export> "
            "and/or base_model=<a Stable Diffusion hub id or directory>."
        )
    images = pipeline(captions, cfg.num_per_caption, cfg.seed)
    settings = {**settings, "num_per_caption": cfg.num_per_caption, "seed": cfg.seed, "device": device}
    out_dir = to_absolute_path(cfg.out_dir)
    files = write_images(images, captions, out_dir, settings)
    print(f"wrote {len(files)} images for {len(captions)} captions to {out_dir}")
    return files


def gan_pipeline(cfg: DictConfig, device: str):
    from hydra.utils import to_absolute_path

    from src.pipelines.text_to_webtoon_gan import TextToWebtoonGANPipeline

    ckpt_path = to_absolute_path(cfg.ckpt_path)
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(
            f"ckpt_path={cfg.ckpt_path} is not a file: point it at a checkpoint of train.py."
        )
    return TextToWebtoonGANPipeline.from_checkpoint(ckpt_path, device=device), {"ckpt_path": ckpt_path}


def stable_diffusion_pipeline(cfg: DictConfig, device: str):
    from hydra.utils import to_absolute_path

    from src.pipelines.stable_diffusion import StableDiffusionGenerator, read_export_record

    weights = to_absolute_path(cfg.weights) if cfg.weights else None
    if weights and not Path(weights).exists():
        raise FileNotFoundError(
            f"weights={cfg.weights} does not exist: point it at a run's export/ directory."
        )
    record = read_export_record(weights)
    base_model = cfg.base_model or record.get("base_model")
    if base_model and Path(to_absolute_path(base_model)).exists():
        base_model = to_absolute_path(base_model)
    method = cfg.method or record.get("method") or ("base" if not weights else None)
    if method is None:
        raise ValueError(
            f"weights={cfg.weights} has no finetune.json: say which method wrote it (method=...)."
        )
    generator = StableDiffusionGenerator.load(
        base_model,
        method,
        weights,
        multiplier=cfg.multiplier,
        device=device,
        num_inference_steps=cfg.num_inference_steps,
        guidance_scale=cfg.guidance_scale,
        negative_prompt=cfg.negative_prompt,
    )
    settings = {
        "base_model": base_model,
        "method": method,
        "weights": weights,
        "multiplier": cfg.multiplier,
        "prompt_aliases": generator.prompt_aliases,
        "num_inference_steps": cfg.num_inference_steps,
        "guidance_scale": cfg.guidance_scale,
        "negative_prompt": cfg.negative_prompt,
    }
    return generator, settings


@hydra.main(version_base="1.3", config_path="configs", config_name="generate")
def main(cfg: DictConfig) -> dict[str, str]:
    """Command-line entry point: ``python generate.py ckpt_path=... captions=[...]`` (GAN) or
    ``python generate.py weights=<export dir> captions=[...]`` (Stable Diffusion)."""
    return generate_from_config(cfg)


if __name__ == "__main__":
    main()
