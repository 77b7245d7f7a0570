"""Control images for ControlNet: what a detector makes of an image, on the fly or precomputed into shards.

A detector is a function image -> control image (RGB, the image's size). :class:`CannyDetector` is OpenCV's
Canny, exactly what controlnet_aux's ``CannyDetector`` runs (which also resizes to its ``detect_resolution``
first). Controls are made in one of two ways:

- on the fly, by :class:`ControlShardDataModule` while it reads the shards, on each image at the training size;
- once, by :func:`write_control_shards`: each shard rewritten with a ``<key>.control.png`` member (at the image's
  size) and the detector recorded in ``controls.json``. The data module then reads the member instead of
  detecting. Resumable per shard; corrupt records are skipped and counted, as the training reader counts them.

Batches: ``pixel_values`` [B, 3, S, S] in [-1, 1], ``control`` [B, 3, S, S] in [0, 1], ``captions``, ``key``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from src.data.datamodule import WORKER_START
from src.data.pipeline import (
    SKIPPED_KEY,
    CorruptSample,
    SizedPipeline,
    SkipCounter,
    SkipPolicy,
    choose_caption,
    decode_record,
    draw_rng,
    expand_shards,
    shard_pipeline,
    worker_share,
)
from src.data.position import PositionedDataModule, ResumableLoader, TrainingPosition
from src.data.preprocess import Preprocess
from src.data.schema import LANGUAGES, SPLITS
from src.data.shards import count_records as count_shard_records
from src.data.shards import read_records, read_sizes, split_of, update_sizes
from src.utils.workers import die_with_parent

__all__ = [
    "CONTROL_KEY",
    "CONTROLS_FILE",
    "CannyDetector",
    "ControlShardDataModule",
    "Detector",
    "write_control_shards",
]

log = logging.getLogger(__name__)

CONTROL_KEY = "control.png"
CONTROLS_FILE = "controls.json"  # the detector that wrote a directory's control members
Detector = Callable[[Image.Image], Image.Image]


# --- detectors --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CannyDetector:
    """Canny edges of an RGB image, white on black, same size: controlnet_aux's ``CannyDetector`` at the image's
    own resolution (OpenCV's ``cv2.Canny`` on the three channels, hysteresis thresholds as there)."""

    low_threshold: int = 100
    high_threshold: int = 200

    def __post_init__(self) -> None:
        if not 0 <= self.low_threshold <= self.high_threshold:
            raise ValueError(
                f"Canny thresholds must satisfy 0 <= low_threshold <= high_threshold, got "
                f"{self.low_threshold} and {self.high_threshold}"
            )

    def __call__(self, image: Image.Image) -> Image.Image:
        try:
            import cv2
        except ImportError as error:
            raise ImportError("Canny control images need OpenCV: pip install -e '.[controlnet]'") from error
        edges = cv2.Canny(np.asarray(image.convert("RGB")), self.low_threshold, self.high_threshold)
        return Image.fromarray(edges).convert("RGB")


# --- the precompute stage ---------------------------------------------------------------------------------------


def write_control_shards(
    shards: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    detector: Detector,
    progress: bool = True,
) -> dict[str, Any]:
    """Write every input shard to ``out_dir/<same name>`` with a ``control.png`` per record; returns stats.

    A shard counts as done once its output exists, and its output appears only when the whole input was read,
    so an interrupted run redoes only unfinished shards. Records whose image or json does not decode are skipped
    and counted (``samples_corrupt``, by reason in ``corrupt``); unreadable shards fail together in one error
    after the others are written. ``sizes.json`` counts the records written.
    """
    paths = [Path(url) for url in expand_shards([str(s) for s in _as_list(shards)])]
    if len({p.name for p in paths}) != len(paths):
        raise ValueError(
            "Two input shards share a file name; outputs are named after inputs, so they would clash."
        )
    out_dir = Path(out_dir)
    if any(p.resolve().parent == out_dir.resolve() for p in paths):
        raise ValueError(f"out_dir={out_dir} holds input shards; write the controls to another directory.")
    out_dir.mkdir(parents=True, exist_ok=True)
    record = _check_or_write_record(out_dir, detector)
    stats: dict[str, Any] = {
        "shards_written": 0,
        "shards_skipped": 0,
        "shards_failed": [],
        "samples_written": 0,
        "samples_corrupt": 0,
        "corrupt": Counter(),
    }
    with tqdm(unit="sample", disable=not progress, desc="controls") as bar:
        for path in paths:
            target = out_dir / path.name
            if target.exists():
                stats["shards_skipped"] += 1
                continue
            try:
                _detect_shard(path, target, detector, stats, bar)
            except (tarfile.TarError, EOFError, OSError) as error:
                log.warning("%s could not be read to the end, not marked done: %s", path, error)
                stats["shards_failed"].append(f"{path} ({type(error).__name__}: {error})")
                continue
            stats["shards_written"] += 1
    if stats["shards_failed"]:
        raise RuntimeError(
            f"Controls: {len(stats['shards_failed'])} input shard(s) could not be read to the end and were not "
            f"written: {'; '.join(stats['shards_failed'])}. The others are done; rerun to retry, and rebuild "
            "or remove a damaged input shard."
        )
    # Recounted from the outputs on disk, so sizes.json is right after interrupted or partial runs too.
    counts = {}
    for split in sorted({split_of(p.name) for p in paths}):
        outputs = [p for p in out_dir.glob(f"{split}-*.tar") if split_of(p.name) == split]
        counts[split] = sum(count_shard_records(p) for p in outputs)
    update_sizes(out_dir, counts)
    stats.update(sizes=counts, detector=record["detector"], corrupt=dict(stats["corrupt"]))
    if stats["samples_corrupt"]:
        warnings.warn(
            f"Controls: skipped {stats['samples_corrupt']} unreadable samples ({stats['corrupt']}).",
            stacklevel=2,
        )
    return stats


def _as_list(value: Any) -> list:
    return [value] if isinstance(value, str | os.PathLike) else list(value)


def _check_or_write_record(out_dir: Path, detector: Detector) -> dict[str, str]:
    """``controls.json`` naming the detector; one directory never mixes two detectors' controls."""
    record = {"detector": repr(detector), "member": CONTROL_KEY}
    path = out_dir / CONTROLS_FILE
    if path.exists():
        previous = json.loads(path.read_text())
        if previous.get("detector") != record["detector"]:
            raise ValueError(
                f"{out_dir} already holds controls of {previous.get('detector')}, not {record['detector']}: "
                "use a new out_dir or delete it."
            )
        return previous
    path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def _detect_shard(source: Path, target: Path, detector: Detector, stats: dict, bar: tqdm) -> None:
    """Copy ``source`` to ``target`` with a control member per record; the temp file is renamed once complete."""
    partial = target.with_name(target.name + ".tmp")
    partial.unlink(missing_ok=True)
    try:
        # mtime=0 like write_shards: the same input and detector give byte-identical shards.
        with wds.TarWriter(str(partial), encoder=False, mtime=0) as sink:
            for record in read_records(source):
                try:
                    image = decode_record(record).image
                except CorruptSample as error:
                    stats["samples_corrupt"] += 1
                    stats["corrupt"][error.reason] += 1
                    log.warning("%s: skipping sample %r: %s", source.name, record["__key__"], error)
                    continue
                record = {k: v for k, v in record.items() if k != "__url__"}
                record[CONTROL_KEY] = png_bytes(detector(image))
                sink.write(record)
                stats["samples_written"] += 1
                bar.update()
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, target)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --- training data ----------------------------------------------------------------------------------------------


def raw_record_stage(
    prepare: Callable[[dict], dict], counter: SkipCounter
) -> Callable[[Iterable[dict]], Iterator[dict]]:
    """``shard_pipeline``'s sample stage for control shards: ``prepare`` gets the tar record as read; records
    it refuses (:class:`CorruptSample`) are skipped and counted."""

    def stage(records: Iterable[dict]) -> Iterator[dict]:
        for record in records:
            try:
                item = prepare(record)
            except CorruptSample as error:
                counter.skip(error.reason, record.get("__key__", "?"), str(error))
                continue
            counter.passed()
            yield item

    return stage


class ControlShardDataModule(PositionedDataModule):
    """Webdataset shards (prepare_data.py's, img2dataset's) -> ControlNet batches at ``resolution``.

    Each image is resized (shorter side) and centre-cropped to ``resolution``, as diffusers' train_controlnet.py
    does; its control is the record's ``control.png`` (from :func:`write_control_shards`, resized and cropped the
    same way) or else ``detector``'s output on the cropped image. One random caption in ``languages`` per image.
    """

    def __init__(
        self,
        root: str | None = None,
        train_shards: str | list[str] | None = None,
        val_shards: str | list[str] | None = None,
        test_shards: str | list[str] | None = None,
        detector: Detector | None = None,
        resolution: int = 512,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        languages: Sequence[str] = ("en",),
        train_samples: int | None = None,
        shuffle_buffer: int = 1000,
        resample: bool = False,
        seed: int = 0,
        skip_policy: dict[str, Any] | None = None,
        builders: dict[str, Callable[[], Any]] | None = None,
    ) -> None:
        """``root``: a directory of ``{split}-*.tar`` shards; an explicit ``{split}_shards`` pattern wins.
        ``detector``: makes the controls of records without a ``control.png`` (null: such records are skipped
        and counted as ``no_control``). ``builders`` run once before reading, to write missing inputs."""
        super().__init__()
        if set(languages) - set(LANGUAGES) or not languages:
            raise ValueError(
                f"data.languages must be a non-empty subset of {list(LANGUAGES)}, got {languages}"
            )
        if resolution < 1 or batch_size < 1:
            raise ValueError(
                f"data.resolution and data.batch_size must be positive, got {resolution}, {batch_size}"
            )
        # Code, not settings: kept out of the checkpoint, which stays weights_only-loadable.
        self.save_hyperparameters(ignore=["detector", "builders"], logger=False)
        self.detector = detector
        self.builders = {name: build for name, build in (builders or {}).items() if build is not None}
        self.skip_policy = SkipPolicy(**(skip_policy or {}))
        self.resize_crop = Preprocess(image_size=resolution).image_transform()
        self.skipped: Counter[str] = Counter()

    def prepare_data(self) -> None:
        for build in self.builders.values():
            build()

    def shards(self, split: str) -> str | list[str]:
        explicit = self.hparams[f"{split}_shards"]
        if explicit:
            return explicit
        if not self.hparams.root:
            raise ValueError(
                f"No {split} shards: set data.root (a directory of {split}-*.tar shards) or data.{split}_shards."
            )
        return str(Path(self.hparams.root) / f"{split}-*.tar")

    def num_train_samples(self) -> int:
        if self.hparams.train_samples:
            return int(self.hparams.train_samples)
        first = Path(expand_shards(self.shards("train"))[0])
        samples = read_sizes(first.parent).get("train")
        if not samples:
            raise ValueError(
                "Set data.train_samples or put a sizes.json with a 'train' count beside the shards."
            )
        return samples

    # --- per record (in the loader workers) ---------------------------------------------------------------

    def prepare_train(self, record: dict) -> dict[str, Any]:
        return self.prepare(record, self.position.epoch.get())

    def prepare_eval(self, record: dict) -> dict[str, Any]:
        return self.prepare(record, "evaluation")  # one fixed caption per image

    def prepare(self, record: dict, draw: int | str) -> dict[str, Any]:
        """A raw record -> ``{"pixels", "control"}`` (uint8 [3, S, S]), ``caption``, ``key``; the caption is
        drawn from (seed, ``draw``, key): the same however the run got here."""
        sample = decode_record(record)
        rng = draw_rng(self.hparams.seed, draw, sample.key)
        caption, _ = choose_caption(sample, self.hparams.languages, rng)
        pixels = self.resize_crop(sample.image)
        if CONTROL_KEY in record:
            try:
                control = Image.open(io.BytesIO(record[CONTROL_KEY])).convert("RGB")
            except Exception as error:  # PIL raises many types for bad bytes
                raise CorruptSample("bad_control", f"{sample.key}: {error}") from error
            if control.size != sample.image.size:
                raise CorruptSample(
                    "bad_control", f"{sample.key}: control {control.size}, image {sample.image.size}"
                )
            control = self.resize_crop(control)
        elif self.detector is not None:
            control = self.resize_crop(self.detector(Image.fromarray(pixels.permute(1, 2, 0).numpy())))
        else:
            raise CorruptSample("no_control", f"{sample.key} has no {CONTROL_KEY} and data.detector is null")
        return {"pixels": pixels, "control": control, "caption": caption, "key": sample.key}

    @staticmethod
    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "pixel_values": torch.stack([item["pixels"] for item in items]).float() / 127.5 - 1.0,
            "control": torch.stack([item["control"] for item in items]).float() / 255.0,
            "captions": [item["caption"] for item in items],
            "key": [item["key"] for item in items],
        }

    # --- loaders ------------------------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        world_size = self.trainer.world_size if self.trainer else 1
        batches = max(1, self.num_train_samples() // (self.hparams.batch_size * world_size))
        pipeline = shard_pipeline(
            self.shards("train"),
            self.prepare_train,
            self.collate,
            self.hparams.batch_size,
            training=True,
            seed=self.hparams.seed,
            epoch=self.position.epoch,
            shuffle_buffer=self.hparams.shuffle_buffer,
            resample=self.hparams.resample,
            skip_policy=self.skip_policy,
            sample_stage=raw_record_stage,  # the record as read: its control.png is no part of a decoded sample
        )
        # Every worker's share adds up to `batches`: the same number of steps on every rank (see datamodule.py).
        # each epoch's draws follow from its number; a resumed epoch drops the batches already trained
        return self._loader(SizedPipeline(pipeline.compose(worker_share(batches)), batches), self.position)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")

    def eval_dataloader(self, split: str) -> DataLoader:
        """Every record of ``split`` once, in order."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        pipeline = shard_pipeline(
            self.shards(split),
            self.prepare_eval,
            self.collate,
            self.hparams.eval_batch_size or self.hparams.batch_size,
            training=False,
            skip_policy=self.skip_policy,
            sample_stage=raw_record_stage,  # the record as read: its control.png is no part of a decoded sample
        )
        return self._loader(pipeline)

    def _loader(
        self, pipeline: wds.DataPipeline, position: TrainingPosition | None = None
    ) -> ResumableLoader:
        workers = self.hparams.num_workers
        return ResumableLoader(
            pipeline,
            position=position,
            batch_size=None,
            num_workers=workers,
            persistent_workers=workers > 0,
            worker_init_fn=die_with_parent if workers > 0 else None,
            multiprocessing_context=WORKER_START if workers > 0 else None,
        )

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        skipped = batch.pop(SKIPPED_KEY, {})
        if skipped:
            self.skipped.update(skipped)
            log.warning("Data: skipped so far %s", dict(self.skipped))
        return super().on_after_batch_transfer(batch, dataloader_idx)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "skipped": dict(self.skipped)}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.skipped = Counter(state_dict.get("skipped", {}))
