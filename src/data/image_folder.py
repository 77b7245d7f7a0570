"""A small folder of captioned images -> batches for Stable Diffusion fine-tuning (Textual Inversion, DreamBooth,
LoRA, hypernetworks).

These methods train on 5-200 images, in whatever caption format the user already has: diffusers'
``metadata.jsonl``, kohya's ``.txt``/``.caption`` sidecars, or our bilingual webdataset shards. The whole
folder is read and every image decoded once up front (the sets are small), so a corrupt file is counted and
dropped before training starts instead of failing a step. Items carry a ``cache_key`` that names the exact
pixels, so a trainer may cache VAE latents whenever the pixels are reproducible. The data stage knows
nothing of the model: prompts are plain strings, pixels are in [-1, 1].
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms.functional as TF
import webdataset as wds
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, RandomSampler

from src.data.pipeline import CorruptSample, decode_record, describe_skips
from src.data.position import PositionedDataModule, ResumableLoader, SharedEpoch
from src.data.schema import IMAGE_EXTENSIONS, LANGUAGES
from src.utils.seeding import derived_seed
from src.utils.workers import die_with_parent

log = logging.getLogger(__name__)

METADATA_FILE = "metadata.jsonl"
# kohya writes .txt (taggers) or .caption (BLIP); when both exist the .txt wins, as our captioning stage writes it.
SIDECAR_EXTENSIONS = (".txt", ".caption")
ACCEPTED_FORMATS = (
    f"image files ({', '.join('.' + ext for ext in IMAGE_EXTENSIONS)}) captioned by diffusers' {METADATA_FILE} "
    '(one {"file_name": ..., "text": ...} per line), by kohya sidecars (<image stem>.txt or .caption, first '
    "line), or not at all; or webdataset shards (*.tar) written by prepare_data.py"
)


@dataclass(frozen=True)
class CaptionedImage:
    """One readable image of a folder with its captions (none, one, or a shard's several)."""

    name: str  # path relative to the folder, or "<shard file>/<key>"
    captions: tuple[str, ...] = ()
    path: Path | None = None  # an image file ...
    data: bytes | None = None  # ... or the image bytes of a shard record

    @property
    def caption(self) -> str | None:
        return self.captions[0] if self.captions else None

    def open(self) -> Image.Image:
        return open_rgb(self.path if self.path is not None else io.BytesIO(self.data))


def open_rgb(source: Path | io.BytesIO) -> Image.Image:
    """An image as RGB, turned upright as its EXIF orientation says (phone photos)."""
    with Image.open(source) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


def decodes(path: Path) -> bool:
    """Whether the image file decodes in full: truncated files open fine and fail only when loaded."""
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except Exception:  # PIL raises many types for bad bytes
        return False


# ---- reading a folder -----------------------------------------------------------------------------------
def read_captioned_images(
    image_dir: str | os.PathLike, caption_language: str = "en"
) -> tuple[list[CaptionedImage], Counter[str]]:
    """Every readable image of ``image_dir`` (sorted by name) with its captions, and the skipped ones by reason.

    Raises one error naming the folder, the counts and the accepted formats when nothing usable is there.
    """
    folder = Path(image_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"The image folder {folder} does not exist. Expected {ACCEPTED_FORMATS}.")
    images, skipped = scan_image_folder(folder, caption_language)
    if not images:
        raise ValueError(
            f"No usable image in {folder}: 0 readable images, skipped by reason: {describe_skips(skipped)}. "
            f"Expected {ACCEPTED_FORMATS}."
        )
    return images, skipped


def scan_image_folder(
    folder: Path, caption_language: str = "en"
) -> tuple[list[CaptionedImage], Counter[str]]:
    """:func:`read_captioned_images` without the error: an empty or missing folder gives no images."""
    if caption_language not in LANGUAGES:
        raise ValueError(f"caption_language must be one of {list(LANGUAGES)}, got {caption_language!r}")
    skipped: Counter[str] = Counter()
    if not folder.is_dir():
        return [], skipped
    metadata = _read_metadata(folder, skipped)
    images = _read_image_files(folder, metadata, skipped) + _read_shards(folder, caption_language, skipped)
    return sorted(images, key=lambda image: image.name), skipped


def list_image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted; hidden files (macOS ``._*`` forks) are not images."""
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file()
        and path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
        and not path.name.startswith(".")
    )


def read_sidecar(image_path: Path) -> str | None:
    """The first non-empty line of the image's kohya caption file, if it has one."""
    for extension in SIDECAR_EXTENSIONS:
        sidecar = image_path.with_suffix(extension)
        if sidecar.is_file():
            # utf-8-sig: captions written by Windows tools start with a byte-order mark
            lines = sidecar.read_text(encoding="utf-8-sig", errors="replace").splitlines()
            return next((line.strip() for line in lines if line.strip()), None)
    return None


def _read_metadata(folder: Path, skipped: Counter[str]) -> dict[str, str | None]:
    """``file_name -> caption`` from diffusers' metadata.jsonl (``text``, or ``caption`` as some tools write)."""
    path = folder / METADATA_FILE
    if not path.is_file():
        return {}
    captions: dict[str, str | None] = {}
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            name = Path(entry["file_name"]).as_posix()
        except (ValueError, KeyError, TypeError):
            skipped["bad_metadata_line"] += 1
            continue
        text = entry.get("text", entry.get("caption"))
        captions[name] = text.strip() if isinstance(text, str) and text.strip() else None
    return captions


def _read_image_files(
    folder: Path, metadata: dict[str, str | None], skipped: Counter[str]
) -> list[CaptionedImage]:
    # metadata.jsonl may name files in subfolders (diffusers' ImageFolder allows it); the rest are beside it
    names = {path.name for path in list_image_files(folder)} | set(metadata)
    images = []
    for name in sorted(names):
        path = folder / name
        if not path.is_file():
            skipped["missing_image"] += 1
            continue
        if not decodes(path):
            skipped["bad_image"] += 1
            continue
        caption = read_sidecar(path) or metadata.get(name)
        images.append(CaptionedImage(name=name, captions=(caption,) if caption else (), path=path))
    return images


def _read_shards(folder: Path, caption_language: str, skipped: Counter[str]) -> list[CaptionedImage]:
    shards = sorted(str(path) for path in folder.glob("*.tar"))
    if not shards:
        return []

    def count_tar_error(error: Exception) -> bool:
        skipped["unreadable_tar"] += 1
        return True

    images = []
    records = wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples(handler=count_tar_error))
    for record in records:
        try:
            sample = decode_record(record)
        except CorruptSample as error:
            skipped[error.reason] += 1
            continue
        image_ext = next(ext for ext in IMAGE_EXTENSIONS if ext in record)
        images.append(
            CaptionedImage(
                name=f"{Path(record['__url__']).name}/{sample.key}",
                captions=tuple(sample.captions([caption_language])),
                data=record[image_ext],
            )
        )
    return images


# ---- one image -> one training item ---------------------------------------------------------------------
def subset_indices(num_available: int, num_images: int | None, seed: int = 0) -> list[int]:
    """``num_images`` indices of a seeded permutation, in order: the subsets of one seed are nested (5 ⊂ 50)."""
    if num_images is None:
        return list(range(num_available))
    if not 0 < num_images <= num_available:
        raise ValueError(
            f"num_images={num_images} asked, but the folder holds {num_available} usable images."
        )
    permutation = torch.randperm(num_available, generator=torch.Generator().manual_seed(seed))
    return sorted(permutation[:num_images].tolist())


class CaptionedImageDataset(Dataset):
    """Each chosen image ``repeats`` times per epoch as ``{pixel_values, caption, cache_key}``.

    The caption is ``instance_prompt`` when set (DreamBooth), else the image's own (its captions in turn over
    the repeats), else one of ``fallback_captions`` by item index (Textual Inversion's templates).
    ``cache_key`` is ``key_offset + 2 * image_index + flipped``, or -1 under random crops, whose pixels differ
    every time and must not be served from a latent cache. Crops and flips are drawn from (``seed``, the epoch in
    ``epoch``, item index): the same however the run got to that epoch, in any loader worker.
    """

    def __init__(
        self,
        images: Sequence[CaptionedImage],
        resolution: int = 512,
        num_images: int | None = None,
        subset_seed: int = 0,
        repeats: int = 1,
        center_crop: bool = True,
        random_flip: bool = False,
        instance_prompt: str | None = None,
        fallback_captions: Sequence[str] = ("a photo of *",),
        key_offset: int = 0,
        seed: int = 0,
        epoch: SharedEpoch | None = None,
    ):
        if repeats < 1 or resolution < 1:
            raise ValueError(f"repeats and resolution must be >= 1, got {repeats} and {resolution}")
        self.images = list(images)
        self.indices = subset_indices(len(self.images), num_images, subset_seed)
        self.resolution = resolution
        self.repeats = repeats
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.instance_prompt = instance_prompt
        self.fallback_captions = list(fallback_captions or ())
        self.key_offset = key_offset
        self.seed = seed
        self.epoch = epoch or SharedEpoch()
        self.fallback_names: set[str] = set()
        uncaptioned = sum(1 for i in self.indices if not self.images[i].captions)
        if instance_prompt is None and uncaptioned and not self.fallback_captions:
            raise ValueError(
                f"{uncaptioned} of {len(self.indices)} images have no caption: set instance_prompt or "
                "fallback_captions, or caption them (python prepare_data.py source=captions ...)."
            )

    def __len__(self) -> int:
        return len(self.indices) * self.repeats

    def __getitem__(self, index: int) -> dict[str, Any]:
        repeat, position = divmod(index, len(self.indices))
        image_index = self.indices[position]
        image = self.images[image_index]
        draws = torch.Generator().manual_seed(
            derived_seed(self.seed, self.epoch.get(), self.key_offset, index)
        )
        pixel_values, flipped = self.pixels(image.open(), draws)
        cache_key = self.key_offset + 2 * image_index + int(flipped) if self.center_crop else -1
        return {
            "pixel_values": pixel_values,
            "caption": self.caption(image, index, repeat),
            "cache_key": cache_key,
        }

    def caption(self, image: CaptionedImage, index: int, repeat: int) -> str:
        if self.instance_prompt is not None:
            return self.instance_prompt
        if image.captions and image.name not in self.fallback_names:
            return image.captions[repeat % len(image.captions)]
        return self.fallback_captions[index % len(self.fallback_captions)]

    def training_captions(self) -> dict[str, list[str]]:
        """Each chosen image's name -> every caption it is trained with (over all repeats)."""
        captions: dict[str, list[str]] = {}
        for index in range(len(self)):
            repeat, position = divmod(index, len(self.indices))
            image = self.images[self.indices[position]]
            captions.setdefault(image.name, []).append(self.caption(image, index, repeat))
        return {name: list(dict.fromkeys(texts)) for name, texts in captions.items()}

    def use_fallback_captions(self, names: Sequence[str]) -> None:
        """Train the named images with ``fallback_captions`` instead of their own (e.g. captions that lack a
        word the method needs)."""
        if not self.fallback_captions:
            raise ValueError("use_fallback_captions needs data.fallback_captions, and none are set.")
        self.fallback_names |= set(names)

    def pixels(self, image: Image.Image, draws: torch.Generator | None = None) -> tuple[torch.Tensor, bool]:
        """Shorter side resized to the resolution, cropped square, maybe flipped -> float32 [3,R,R] in [-1, 1]."""
        size = self.resolution
        image = TF.resize(image, size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        if self.center_crop:
            image = TF.center_crop(image, [size, size])
        else:
            top = int(torch.randint(0, image.height - size + 1, (), generator=draws))
            left = int(torch.randint(0, image.width - size + 1, (), generator=draws))
            image = TF.crop(image, top, left, size, size)
        flipped = self.random_flip and bool(torch.rand((), generator=draws) < 0.5)
        if flipped:
            image = TF.hflip(image)
        return TF.pil_to_tensor(image).float() / 127.5 - 1.0, flipped


class PriorPreservationDataset(Dataset):
    """Pairs each instance item with a class item, over the longer of the two (diffusers' DreamBooth dataset)."""

    def __init__(self, instance: Dataset, prior: Dataset):
        self.instance, self.prior = instance, prior

    def __len__(self) -> int:
        return max(len(self.instance), len(self.prior))

    def __getitem__(self, index: int) -> tuple[dict, dict]:
        return self.instance[index % len(self.instance)], self.prior[index % len(self.prior)]


def collate_captioned(items: list[dict | tuple[dict, dict]]) -> dict[str, Any]:
    """The B instance items, then (with prior preservation) their B class items, in one batch."""
    pairs = [item if isinstance(item, tuple) else (item,) for item in items]
    examples = [pair[0] for pair in pairs] + [pair[1] for pair in pairs if len(pair) > 1]
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "captions": [example["caption"] for example in examples],
        "cache_key": torch.tensor([example["cache_key"] for example in examples], dtype=torch.long),
        "is_prior": torch.arange(len(examples)) >= len(pairs),
    }


# ---- the datamodule --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PriorPreservation:
    """DreamBooth's class images: ``num_class_images`` in ``class_dir``, the missing ones made by ``generator``."""

    class_dir: str
    class_prompt: str
    num_class_images: int = 100
    # (prompt, num_images, out_dir) -> None; src.pipelines.class_images.generate_class_images as a _partial_
    generator: Callable[[str, int, Path], None] | None = None


class CaptionedImageDataModule(PositionedDataModule):
    """Batches of a captioned image folder: ``pixel_values`` [B,3,R,R] in [-1, 1], ``captions``, ``cache_key``
    [B] and ``is_prior`` [B]; with ``prior_preservation`` each batch holds B instance then B class examples."""

    def __init__(
        self,
        image_dir: str,
        resolution: int = 512,
        num_images: int | None = None,
        subset_seed: int = 0,
        repeats: int = 1,
        center_crop: bool = True,
        random_flip: bool = False,
        batch_size: int = 1,
        num_workers: int = 0,
        instance_prompt: str | None = None,
        fallback_captions: Sequence[str] = ("a photo of *",),
        caption_language: str = "en",
        prior_preservation: dict[str, Any] | None = None,
        seed: int = 0,
    ):
        """``subset_seed`` picks the ``num_images`` subset; ``seed`` the shuffling of the training loader."""
        super().__init__()
        # The generator is code, not a setting: kept out of the checkpoint, which stays weights_only-loadable.
        self.save_hyperparameters(ignore=["prior_preservation"], logger=False)
        self.prior_preservation = PriorPreservation(**prior_preservation) if prior_preservation else None
        self.train_dataset: Dataset | None = None
        self.skipped: Counter[str] = Counter()

    def prepare_data(self) -> None:
        """Generate the missing class images once; reruns find them in ``class_dir`` and reuse them."""
        prior = self.prior_preservation
        if prior is None:
            return
        class_dir = Path(prior.class_dir)
        have = len(scan_image_folder(class_dir, self.hparams.caption_language)[0])
        missing = prior.num_class_images - have
        if missing <= 0:
            return
        if prior.generator is None:
            raise ValueError(
                f"{class_dir} holds {have} of the {prior.num_class_images} class images and "
                "data.prior_preservation.generator is not set to make the rest."
            )
        log.info("Generating %d class images of %r into %s", missing, prior.class_prompt, class_dir)
        class_dir.mkdir(parents=True, exist_ok=True)
        prior.generator(prior.class_prompt, missing, class_dir)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        hp = self.hparams
        images, self.skipped = read_captioned_images(hp.image_dir, hp.caption_language)
        log.info(
            "Found %d images in %s (skipped: %s)", len(images), hp.image_dir, describe_skips(self.skipped)
        )
        crop_and_flip = {
            "center_crop": hp.center_crop,
            "random_flip": hp.random_flip,
            "seed": hp.seed,
            "epoch": self.position.epoch,
        }
        instance = CaptionedImageDataset(
            images,
            resolution=hp.resolution,
            num_images=hp.num_images,
            subset_seed=hp.subset_seed,
            repeats=hp.repeats,
            instance_prompt=hp.instance_prompt,
            fallback_captions=hp.fallback_captions,
            **crop_and_flip,
        )
        self.train_dataset = instance
        prior = self.prior_preservation
        if prior is None:
            return
        class_images, class_skipped = read_captioned_images(prior.class_dir, hp.caption_language)
        log.info(
            "Found %d class images in %s (skipped: %s)",
            len(class_images),
            prior.class_dir,
            describe_skips(class_skipped),
        )
        if len(class_images) < prior.num_class_images:
            raise ValueError(
                f"{prior.class_dir} holds {len(class_images)} of the {prior.num_class_images} class images: "
                "run the datamodule's prepare_data() (the trainer does) with a generator configured."
            )
        self.skipped += Counter({f"class_{reason}": n for reason, n in class_skipped.items()})
        class_dataset = CaptionedImageDataset(
            class_images[: prior.num_class_images],
            resolution=hp.resolution,
            instance_prompt=prior.class_prompt,
            # past every instance key, so one latent cache can hold both
            key_offset=2 * len(images),
            **crop_and_flip,
        )
        self.train_dataset = PriorPreservationDataset(instance, class_dataset)

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise RuntimeError("Call setup() before train_dataloader() (the trainer does).")
        workers = self.hparams.num_workers
        return ResumableLoader(
            self.train_dataset,
            position=self.position,
            position_seed=self.hparams.seed,
            batch_size=self.hparams.batch_size,
            # its generator is re-seeded from (seed, epoch) as each epoch starts
            sampler=RandomSampler(self.train_dataset, generator=torch.Generator()),
            collate_fn=collate_captioned,
            num_workers=workers,
            persistent_workers=workers > 0,
            worker_init_fn=die_with_parent if workers > 0 else None,
            pin_memory=torch.cuda.is_available(),
        )
