"""Generate webtoon images for English / Korean captions with a trained model: the text-to-webtoon GAN from its
checkpoint, or Stable Diffusion with a fine-tuning method's export.

    python generate.py ckpt_path=CKPT captions='["큰 빨간 원", "a large red circle"]' out_dir=DIR
    python generate.py weights=RUN/export captions='["*, fire"]'
    python generate.py base_model=DIR method=lora weights=FILE captions=...

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

from src.utils.cli import one_line_errors

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
    """Load what the config names through the project's loader, draw every caption, write the images and the
    manifest; returns file -> caption."""
    from hydra.utils import to_absolute_path

    from src.pipelines.loading import load_text_to_image
    from src.utils.device import resolve_device

    captions = [str(c) for c in cfg.captions] if OmegaConf.is_list(cfg.captions) else [str(cfg.captions)]
    if not captions or not all(c.strip() for c in captions):
        raise ValueError("captions must be one or more non-empty strings.")
    device = resolve_device(cfg.device)
    text_to_image = load_text_to_image(
        ckpt_path=_local(cfg.ckpt_path),
        weights=_local(cfg.weights),
        base_model=_local(cfg.base_model),
        method=cfg.method,
        multiplier=cfg.multiplier,
        device=device,
        num_inference_steps=cfg.num_inference_steps,
        guidance_scale=cfg.guidance_scale,
        negative_prompt=cfg.negative_prompt,
    )
    images = text_to_image(captions, cfg.num_per_caption, cfg.seed)
    settings = {
        **text_to_image.settings,
        "num_per_caption": cfg.num_per_caption,
        "seed": cfg.seed,
        "device": str(device),
    }
    out_dir = to_absolute_path(cfg.out_dir)
    files = write_images(images, captions, out_dir, settings)
    print(f"wrote {len(files)} images for {len(captions)} captions to {out_dir}")
    return files


def _local(path: str | None) -> str | None:
    """A path as the user typed it, made absolute when it exists (Hydra may run elsewhere); hub ids unchanged."""
    from hydra.utils import to_absolute_path

    if not path:
        return None
    return to_absolute_path(path) if Path(to_absolute_path(path)).exists() else str(path)


@hydra.main(version_base="1.3", config_path="configs", config_name="generate")
@one_line_errors
def main(cfg: DictConfig) -> dict[str, str]:
    """Command-line entry point: ``python generate.py ckpt_path=... captions=[...]`` (GAN) or
    ``python generate.py weights=<export dir> captions=[...]`` (Stable Diffusion)."""
    return generate_from_config(cfg)


if __name__ == "__main__":
    main()
