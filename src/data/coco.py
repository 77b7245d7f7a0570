"""MSCOCO 2014 images + English captions + AI Hub Korean captions -> bilingual webdataset shards.

The thesis's treatment-webtoon pairs are COCO images with 5 English and 5 Korean captions, cartoonized by
CartoonGAN. Here every image goes through a per-style transform (``styles``) before it is written, one
shard set per style under ``out_dir/<style>/``; plug a CartoonGAN generator in there.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from src.data.schema import SPLITS, WebtoonSample
from src.data.shards import forget_splits, remove_split_shards, write_shards

log = logging.getLogger(__name__)

COCO_URL = "https://cocodataset.org/#download (2014 Train/Val images and 2014 Train/Val annotations)"
AIHUB_URL = (
    "AI Hub (https://aihub.or.kr), the Korean MSCOCO caption data set (MSCOCO 한국어 이미지 설명 데이터셋)"
)
KARPATHY_URL = (
    "the Karpathy split (dataset_coco.json from https://cs.stanford.edu/people/karpathy/deepimagesent/)"
)
_COCO_FILE = re.compile(r"COCO_(train2014|val2014)_0*(\d+)")

ImageTransform = Callable[[Image.Image], Image.Image]


@dataclass
class CocoImage:
    """One COCO image with everything needed to write it: where it lives, its captions and its split."""

    image_id: int
    file_name: str
    subset: str  # "train2014" or "val2014": which COCO release the image comes from
    captions_en: list[str] = field(default_factory=list)
    captions_ko: list[str] = field(default_factory=list)
    split: str | None = None


def _require_file(path: str | os.PathLike | None, setting: str, source: str, directory: bool = False) -> Path:
    """The path, or one clear error that names the setting and where to download the data."""
    if path is None or str(path) == "":
        raise FileNotFoundError(f"{setting} is not set; download it from {source} and set {setting}=PATH")
    path = Path(path).expanduser()
    if not (path.is_dir() if directory else path.is_file()):
        kind = "directory" if directory else "file"
        raise FileNotFoundError(f"{setting}: {kind} {str(path)!r} not found; download it from {source}")
    return path


def _load_json(path: Path) -> object:
    # AI Hub files are sometimes saved with a UTF-8 byte-order mark; utf-8-sig reads both.
    with open(path, encoding="utf-8-sig") as f:
        return json.load(f)


def _clean(captions: Sequence[str] | None) -> list[str]:
    return [c.strip() for c in captions or [] if isinstance(c, str) and c.strip()]


def _subset_of(file_name: str, captions_path: Path) -> str:
    """train2014 / val2014 from the file name (COCO_val2014_...), else from the captions file's name."""
    match = _COCO_FILE.search(file_name)
    if match:
        return match.group(1)
    return "val2014" if "val" in captions_path.name else "train2014"


def load_coco_captions(
    captions_json: str | os.PathLike | Sequence[str | os.PathLike],
) -> dict[int, CocoImage]:
    """Read official COCO caption files into ``{image_id: CocoImage}``, every English caption kept."""
    paths = [captions_json] if isinstance(captions_json, str | os.PathLike) else list(captions_json)
    if not paths:
        raise FileNotFoundError(f"coco.captions_json is empty; download it from {COCO_URL}")
    images: dict[int, CocoImage] = {}
    for raw_path in paths:
        path = _require_file(raw_path, "coco.captions_json", COCO_URL)
        data = _load_json(path)
        if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
            raise ValueError(
                f"coco.captions_json: {path} is not a COCO captions file (needs images + annotations)"
            )
        for entry in data["images"]:
            image_id = int(entry["id"])
            if image_id not in images:
                subset = _subset_of(entry["file_name"], path)
                images[image_id] = CocoImage(image_id, entry["file_name"], subset)
        # Annotation ids give a stable caption order whatever order the file lists them in.
        for annotation in sorted(data["annotations"], key=lambda a: (a["image_id"], a.get("id", 0))):
            image = images.get(int(annotation["image_id"]))
            if image is not None:
                image.captions_en += _clean([annotation.get("caption", "")])
    return images


def load_korean_captions(korean_json: str | os.PathLike) -> dict[int, list[str]]:
    """Read the AI Hub file into ``{image_id: [Korean captions]}``: stripped, empty and repeated ones dropped."""
    path = _require_file(korean_json, "coco.korean_json", AIHUB_URL)
    data = _load_json(path)
    if not isinstance(data, list):
        raise ValueError(f"coco.korean_json: {path} should be a JSON list of {{file_path, id, caption_ko}}")
    korean: dict[int, list[str]] = {}
    for entry in data:
        image_id = entry.get("id")
        if image_id is None:  # fall back to the number in the file name
            match = _COCO_FILE.search(entry.get("file_path", ""))
            if match is None:
                continue
            image_id = match.group(2)
        captions = _clean(entry.get("caption_ko"))
        korean.setdefault(int(image_id), [])
        korean[int(image_id)] += [c for c in captions if c not in korean[int(image_id)]]
    return korean


def load_karpathy_splits(karpathy_json: str | os.PathLike) -> dict[int, str]:
    """``{cocoid: "train" | "val" | "test"}`` from Karpathy's dataset_coco.json; restval counts as train."""
    path = _require_file(karpathy_json, "coco.karpathy_json", KARPATHY_URL)
    data = _load_json(path)
    splits = {}
    for entry in data["images"]:
        split = entry["split"]
        splits[int(entry["cocoid"])] = "train" if split == "restval" else split
    return splits


def thesis_splits(images: dict[int, CocoImage], val_fraction: float = 0.8, seed: int = 0) -> dict[int, str]:
    """COCO train2014 -> train; val2014 shuffled (seeded, from sorted ids) and cut val_fraction : rest."""
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"coco.val_fraction must be within [0, 1], got {val_fraction}")
    splits = {image_id: "train" for image_id, image in images.items() if image.subset == "train2014"}
    coco_val = sorted(image_id for image_id, image in images.items() if image.subset != "train2014")
    random.Random(seed).shuffle(coco_val)
    num_val = round(val_fraction * len(coco_val))
    splits.update({image_id: "val" for image_id in coco_val[:num_val]})
    splits.update({image_id: "test" for image_id in coco_val[num_val:]})
    return splits


def find_image(images_dir: Path, image: CocoImage) -> Path | None:
    """``images_dir/<file_name>`` or ``images_dir/<train2014|val2014>/<file_name>``, whichever exists."""
    for candidate in (images_dir / image.file_name, images_dir / image.subset / Path(image.file_name).name):
        if candidate.is_file():
            return candidate
    return None


def load_image(path: Path, max_image_side: int | None = None) -> Image.Image:
    """Decode fully (so truncated files fail here, not in the writer), as RGB, optionally downscaled."""
    with Image.open(path) as opened:
        image = opened.convert("RGB")  # COCO has a few grayscale and CMYK images
    if max_image_side and max(image.size) > max_image_side:
        image.thumbnail((max_image_side, max_image_side), Image.Resampling.LANCZOS)
    return image


def build_coco_shards(
    captions_json: str | os.PathLike | Sequence[str | os.PathLike],
    images_dir: str | os.PathLike,
    korean_json: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    karpathy_json: str | os.PathLike | None = None,
    val_fraction_of_coco_val: float = 0.8,
    seed: int = 0,
    samples_per_shard: int = 1000,
    styles: dict[str, ImageTransform] | None = None,
    max_image_side: int | None = None,
    require_korean: bool = False,
) -> dict[str, int]:
    """Join COCO 2014 English captions with AI Hub Korean ones and write ``out_dir/<style>/{split}-*.tar``.

    Splits follow the thesis (COCO train -> train; COCO val cut ``val_fraction_of_coco_val`` : rest into
    val/test by a seeded shuffle) unless ``karpathy_json`` is given. ``styles`` maps a style name to a PIL
    transform applied to every image (default ``{"photo": identity}``); a CartoonGAN generator wrapped as
    ``PIL -> PIL`` (e.g. ``{"hayao": cartoonize_hayao}``) produces the thesis's cartoonized shard sets.
    ``korean_json=None`` builds English-only shards. Returns counts: images, joined (with Korean
    captions), missing_korean, dropped_missing_korean, skipped_not_in_split, skipped_missing_image,
    skipped_unreadable_image, and samples per split (the same for every style).
    """
    # Every input is checked before the (slow) reading starts, so a typo fails in a second, not later.
    caption_paths = [captions_json] if isinstance(captions_json, str | os.PathLike) else list(captions_json)
    for path in caption_paths or [None]:
        _require_file(path, "coco.captions_json", COCO_URL)
    images_dir = _require_file(images_dir, "coco.images_dir", COCO_URL, directory=True)
    if korean_json is not None:
        _require_file(korean_json, "coco.korean_json", AIHUB_URL)
    if karpathy_json is not None:
        _require_file(karpathy_json, "coco.karpathy_json", KARPATHY_URL)

    images = load_coco_captions(caption_paths)
    if korean_json is None:
        if require_korean:
            raise FileNotFoundError(
                f"coco.require_korean is true but coco.korean_json is not set; get it from {AIHUB_URL}"
            )
        log.warning(
            "coco.korean_json is not set: writing English-only samples (Korean captions: %s)", AIHUB_URL
        )
        korean: dict[int, list[str]] = {}
    else:
        korean = load_korean_captions(korean_json)
    splits = (
        load_karpathy_splits(karpathy_json)
        if karpathy_json is not None
        else thesis_splits(images, val_fraction_of_coco_val, seed)
    )
    styles = styles or {"photo": lambda image: image}

    counts = {
        "images": len(images),
        "joined": 0,
        "missing_korean": 0,
        "dropped_missing_korean": 0,
        "skipped_not_in_split": 0,
    }
    by_split: dict[str, list[CocoImage]] = {split: [] for split in SPLITS}
    for image_id in sorted(images):
        image = images[image_id]
        image.captions_ko = korean.get(image_id, [])
        if image.captions_ko:
            counts["joined"] += 1
        else:
            counts["missing_korean"] += 1
            if require_korean:
                counts["dropped_missing_korean"] += 1
                continue
        image.split = splits.get(image_id)
        if image.split not in by_split:
            counts["skipped_not_in_split"] += 1
            continue
        by_split[image.split].append(image)

    out_dir = Path(out_dir)
    unusable: dict[int, str] = {}  # image_id -> "missing" | "unreadable", found by the first style's pass
    written: dict[str, int] = {}
    for style, transform in styles.items():
        style_dir = out_dir / style
        for split in SPLITS:  # an interrupted rebuild must not leave an earlier run's counts behind
            remove_split_shards(style_dir, split)
        forget_splits(style_dir, SPLITS)
        for split, split_images in by_split.items():
            samples = _samples(split_images, images_dir, style, transform, max_image_side, unusable)
            written[split] = write_shards(
                tqdm(samples, total=len(split_images), desc=f"{style}/{split}", unit="img"),
                style_dir,
                split,
                samples_per_shard,
                "jpg",
            )
    counts["skipped_missing_image"] = sum(reason == "missing" for reason in unusable.values())
    counts["skipped_unreadable_image"] = sum(reason == "unreadable" for reason in unusable.values())
    counts.update(written)
    log.info("COCO shards in %s: %s", out_dir, counts)
    return counts


def _samples(
    images: list[CocoImage],
    images_dir: Path,
    style: str,
    transform: ImageTransform,
    max_image_side: int | None,
    unusable: dict[int, str],
) -> Iterator[WebtoonSample]:
    """Decode, transform and yield one sample at a time, so no more than one image is held in memory."""
    for image in images:
        if image.image_id in unusable:
            continue
        path = find_image(images_dir, image)
        if path is None:
            unusable[image.image_id] = "missing"
            log.warning("coco.images_dir: no file for image %d (%s)", image.image_id, image.file_name)
            continue
        try:
            pixels = load_image(path, max_image_side)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
            unusable[image.image_id] = "unreadable"
            log.warning("coco.images_dir: cannot read %s (%s)", path, error)
            continue
        yield WebtoonSample(
            key=Path(image.file_name).stem.replace(".", "_"),
            image=transform(pixels),
            captions_en=image.captions_en,
            captions_ko=image.captions_ko,
            style=style,
            image_id=image.image_id,
        )
