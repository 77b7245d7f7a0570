"""BLIP captions for a folder of images, with the subject's phrase swapped for the placeholder (paper 000).

Textual Inversion learns a new word from captions that contain it. Paper 000 captioned each training image
with BLIP and replaced the phrase BLIP used for the subject ("a building with a roof") by the placeholder
``*``. This stage does that and writes one kohya ``.txt`` sidecar per image, the format the image-folder
datamodule (and kohya, and most captioning tools) read; a user can then edit the captions by hand.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from src.data.image_folder import decodes, list_image_files, open_rgb
from src.utils.device import half_precision_dtype, resolve_device
from src.utils.hub import from_pretrained

log = logging.getLogger(__name__)

CAPTIONER_SETTING = "captioner"


def replace_phrases(caption: str, replace: Mapping[str, str]) -> str:
    """``caption`` with each phrase of ``replace`` (whole words, any case) swapped for its replacement.

    Longer phrases win over the shorter ones they contain, and one pass means a replacement is never
    replaced again.
    """
    if not replace:
        return caption
    if not all(phrase.strip() for phrase in replace):
        raise ValueError(f"replace has an empty phrase: {dict(replace)}")
    phrases = sorted(replace, key=len, reverse=True)
    lookup = {phrase.lower(): replacement for phrase, replacement in replace.items()}
    pattern = re.compile(
        r"(?<!\w)(" + "|".join(re.escape(phrase) for phrase in phrases) + r")(?!\w)", re.IGNORECASE
    )
    return pattern.sub(lambda match: lookup[match.group(1).lower()], caption)


def caption_images(
    images_dir: str | os.PathLike,
    captioner: str = "Salesforce/blip-image-captioning-base",
    replace: Mapping[str, str] | None = None,
    batch_size: int = 8,
    overwrite: bool = False,
    max_new_tokens: int = 30,
    device: str | None = None,
) -> dict[str, Any]:
    """Write ``<image stem>.txt`` beside every image of ``images_dir`` that has none (all with ``overwrite``).

    Returns the counts: ``captioned``, ``already_captioned``, ``without_replacement`` (captions where no
    phrase of ``replace`` occurred, so they lack the placeholder) and ``skipped`` by reason.
    """
    folder = Path(images_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"images_dir {folder} is not a directory of images to caption.")
    replace = dict(replace or {})
    paths = list_image_files(folder)
    todo = [p for p in paths if overwrite or not p.with_suffix(".txt").exists()]
    counts: dict[str, Any] = {
        "images": len(paths),
        "captioned": 0,
        "already_captioned": len(paths) - len(todo),
        "without_replacement": 0,
    }
    # checked before the model loads: a folder whose uncaptioned files are all broken needs no model
    readable = [path for path in todo if decodes(path)]
    skipped: Counter[str] = Counter({"bad_image": len(todo) - len(readable)})
    for path in sorted(set(todo) - set(readable)):
        log.warning("Skipping unreadable image %s", path)
    if readable:
        processor, model = load_captioner(captioner, device)
        with tqdm(total=len(readable), desc="captions", unit="img") as bar:
            for start in range(0, len(readable), batch_size):
                batch = readable[start : start + batch_size]
                inputs = processor(images=[open_rgb(path) for path in batch], return_tensors="pt")
                with torch.inference_mode():
                    tokens = model.generate(
                        **inputs.to(model.device, model.dtype), max_new_tokens=max_new_tokens
                    )
                for path, text in zip(
                    batch, processor.batch_decode(tokens, skip_special_tokens=True), strict=True
                ):
                    _write_caption(path, text.strip(), replace, counts, skipped)
                bar.update(len(batch))
    counts["skipped"] = {reason: n for reason, n in skipped.items() if n}
    log.info("Captioned %d images in %s: %s", counts["captioned"], folder, counts)
    return counts


def load_captioner(captioner: str, device: str | None = None) -> tuple[Any, Any]:
    """BLIP's processor and captioning model from a hub id or a local copy (fp16 on GPUs), ready to generate."""
    from transformers import AutoProcessor, BlipForConditionalGeneration

    device = resolve_device(device)
    dtype = half_precision_dtype(device)
    processor = from_pretrained(AutoProcessor.from_pretrained, str(captioner), CAPTIONER_SETTING)
    model = from_pretrained(
        BlipForConditionalGeneration.from_pretrained, str(captioner), CAPTIONER_SETTING, dtype=dtype
    )
    return processor, model.to(device).eval()


def _write_caption(
    path: Path, text: str, replace: Mapping[str, str], counts: dict[str, Any], skipped: Counter[str]
) -> None:
    if not text:
        # an empty sidecar would read as "no caption"; leave the image to the fallback captions instead
        skipped["empty_caption"] += 1
        return
    caption = replace_phrases(text, replace)
    if replace and caption == text:
        counts["without_replacement"] += 1
    path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    counts["captioned"] += 1
