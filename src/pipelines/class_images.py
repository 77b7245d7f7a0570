"""DreamBooth's class images: generated once by the base model from the class prompt, then reused.

Prior preservation trains on the user's few instance images together with images the unmodified model makes
for the bare class prompt ("a photo of a house"), so the fine-tuned model keeps what the class looks like.
This is what the image-folder datamodule calls (a Hydra ``_partial_``, so the data layer never imports a
pipeline) for the images its ``class_dir`` is missing; the base model is loaded through the project's loader,
the files are numbered, never named after the prompt, and captioned in diffusers' ``metadata.jsonl`` so the
folder reads like any other.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from tqdm.auto import tqdm

from src.data.image_folder import METADATA_FILE
from src.pipelines.loading import load_text_to_image
from src.utils.hub import MissingWeightsError, missing_weights
from src.utils.image_grid import to_pil

log = logging.getLogger(__name__)

MODEL_SETTING = "model.pretrained_model_name_or_path"

_CLASS_FILE = re.compile(r"class_(\d+)\.png")


def generate_class_images(
    prompt: str,
    num_images: int,
    out_dir: str | os.PathLike,
    pretrained_model_name_or_path: str,
    sample_batch_size: int = 4,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    seed: int = 0,
    device: str = "auto",
) -> list[Path]:
    """Write ``num_images`` images of ``prompt`` as ``out_dir/class_{i:05d}.png`` after those already there.

    File ``i`` is drawn from the noise of ``seed + i``, so a rerun that continues a folder makes new images
    rather than repeating the first ones. Returns the written paths.
    """
    if num_images <= 0:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        text_to_image = load_text_to_image(
            base_model=str(pretrained_model_name_or_path),
            device=device,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
        )
    except MissingWeightsError as error:  # named by the training config's setting, which the user sets
        raise missing_weights(pretrained_model_name_or_path, MODEL_SETTING, error.__cause__) from None
    first = next_class_index(out_dir)
    written: list[Path] = []
    with tqdm(total=num_images, desc="class images", unit="img") as bar:
        for start in range(first, first + num_images, sample_batch_size):
            count = min(sample_batch_size, first + num_images - start)
            images = text_to_image([prompt], count, seed=seed + start)[0]
            paths = [out_dir / f"class_{start + i:05d}.png" for i in range(count)]
            for image, path in zip(images, paths, strict=True):
                to_pil(image).save(path)
            # after every batch, so an interrupted run leaves a folder whose captions match its files
            with (out_dir / METADATA_FILE).open("a", encoding="utf-8") as metadata:
                for path in paths:
                    metadata.write(
                        json.dumps({"file_name": path.name, "text": prompt}, ensure_ascii=False) + "\n"
                    )
            written += paths
            bar.update(count)
    del text_to_image
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the training that follows needs the memory
    log.info("Wrote %d class images of %r to %s", len(written), prompt, out_dir)
    return written


def next_class_index(out_dir: Path) -> int:
    """One past the highest ``class_NNNNN.png`` number in ``out_dir`` (0 for a folder without any)."""
    numbers = [int(m.group(1)) for p in out_dir.iterdir() if (m := _CLASS_FILE.fullmatch(p.name))]
    return max(numbers, default=-1) + 1
