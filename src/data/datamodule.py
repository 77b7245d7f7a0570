"""One LightningDataModule for every module: bilingual webdataset shards -> image/caption batches."""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from src.data.pipeline import (
    SKIPPED_KEY,
    SizedPipeline,
    SkipPolicy,
    choose_caption,
    choose_parallel_captions,
    describe_skips,
    draw_rng,
    expand_shards,
    feature_row,
    features_of,
    shard_pipeline,
    worker_share,
)
from src.data.position import PositionedDataModule, ResumableLoader, TrainingPosition
from src.data.preprocess import Preprocess
from src.data.schema import LANGUAGES, SPLITS, WebtoonSample
from src.data.shards import read_sizes
from src.utils.workers import die_with_parent, worker_shared_tensor

log = logging.getLogger(__name__)

# Loader workers are forked where the platform can (their pipeline stages are closures, which spawn must pickle).
WORKER_START = "fork" if "fork" in multiprocessing.get_all_start_methods() else None


class WebtoonShardDataModule(PositionedDataModule):
    """Reads the shards of ``root`` (or ``{train,val,test}_shards``) into batches for every module.

    A training batch holds ``image`` [B,3,H,W], ``caption`` (one random caption per image, drawn anew
    each epoch from ``languages``; an evaluation batch's is fixed per image), ``key``, and when the model's preprocessing names a tokenizer,
    ``input_ids``/``attention_mask``. With ``text_features=True`` it also holds the caption's precomputed
    vector ``text_features`` and ``wrong_text_features``, the vector of another sample's caption (the GAN's
    mismatched text). Evaluation batches also carry every caption of every image (``all_captions`` and their
    tokens with ``caption_image_index``), because retrieval treats each caption as a query.
    """

    def __init__(
        self,
        root: str | None = None,
        train_shards: str | list[str] | None = None,
        val_shards: str | list[str] | None = None,
        test_shards: str | list[str] | None = None,
        preprocess: Preprocess | dict[str, Any] | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        languages: Sequence[str] = LANGUAGES,
        text_features: bool = False,
        train_samples: int | None = None,
        shuffle_buffer: int = 1000,
        resample: bool = False,
        seed: int = 0,
        skip_policy: dict[str, Any] | None = None,
        builders: dict[str, Callable[[], Any]] | None = None,
        precompute_features: dict[str, Any] | None = None,
        pin_memory: bool = True,
        reduced_decode: bool = True,
        parallel_captions: bool = False,
    ):
        """``root``: a directory of ``{split}-*.tar`` shards; an explicit ``{split}_shards`` pattern wins.

        ``preprocess`` is the model's (``${model.preprocess}`` in the configs); with ``reduced_decode`` JPEGs
        larger than twice its image size decode at a reduced scale (PIL's ``draft``), never below that size. ``builders`` are called once,
        in order, before reading, to write inputs that are missing (the demo generates its dataset that way).

        ``parallel_captions``: batches also hold ``caption_en`` and ``caption_ko``, an English and a Korean caption
        of the same image (what distilling a Korean text encoder learns from); records lacking either language
        are skipped and counted (``no_parallel_captions``).
        """
        super().__init__()
        unknown = set(languages) - set(LANGUAGES)
        if unknown or not languages:
            raise ValueError(
                f"data.languages must be a non-empty subset of {list(LANGUAGES)}, got {languages}"
            )
        # Builders are code, not settings: kept out of the checkpoint, which stays weights_only-loadable.
        self.save_hyperparameters(ignore=["builders", "preprocess"], logger=False)
        self.preprocess = Preprocess.of(preprocess)
        self.skip_policy = SkipPolicy(**(skip_policy or {}))
        # A builder set to null in a config (an experiment that needs no such input) is dropped.
        self.builders = {name: build for name, build in (builders or {}).items() if build is not None}
        self.shards = {split: self._shards_of(split) for split in SPLITS}
        self.transform = self.preprocess.image_transform()
        self.skipped: Counter[str] = Counter()
        self._delivered = 0
        self._last_summary: tuple[float, int] | None = None

    def _shards_of(self, split: str) -> str | list[str] | None:
        explicit = self.hparams[f"{split}_shards"]
        if explicit:
            return explicit
        return str(Path(self.hparams.root) / f"{split}-*.tar") if self.hparams.root else None

    # ---- setup -------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Write what the configured sources need once: missing inputs (builders), precomputed text features."""
        for name, build in self.builders.items():
            log.debug("data builder %s", name)
            build()
        self._precompute_text_features()

    def _precompute_text_features(self) -> None:
        """Encode every caption once (thesis ch. III) when ``precompute_features`` is set; resumes if interrupted."""
        spec = self.hparams.precompute_features
        if not spec or set(SPLITS) <= set(read_sizes(spec["out_dir"])):
            return
        from src.data.caption_encoder import CaptionEncoder
        from src.data.text_features import precompute_text_features

        log.info("Precomputing text features of %s into %s", spec["shards"], spec["out_dir"])
        precompute_text_features(spec["shards"], spec["out_dir"], CaptionEncoder(**spec["encoder"]))

    @property
    def tokenizer(self):
        return self.preprocess.loaded_tokenizer

    def num_samples(self, split: str) -> int | None:
        """Samples in a split: the setting for train, else ``sizes.json`` beside the shards."""
        if split == "train" and self.hparams.train_samples:
            return int(self.hparams.train_samples)
        if not self.shards[split]:
            return None
        first = expand_shards(self.shards[split])[0]
        return read_sizes(Path(first).parent).get(split)

    # ---- per-sample preparation (runs in the DataLoader workers) -----------------------------------
    def _prepare_train(self, sample: WebtoonSample) -> dict:
        return self._prepare(sample, self.position.epoch.get())

    def _prepare(self, sample: WebtoonSample, draw: int | str) -> dict:
        rng = draw_rng(self.hparams.seed, draw, sample.key)  # the same caption however the run got here
        caption, row = choose_caption(sample, self.hparams.languages, rng)
        item = {"image": self.transform(sample.image), "caption": caption, "key": sample.key}
        if self.hparams.text_features:
            item["text_features"] = features_of(sample, [row])[0]
        if self.hparams.parallel_captions:
            item["caption_en"], item["caption_ko"] = choose_parallel_captions(sample, rng)
        return item

    def _prepare_eval(self, sample: WebtoonSample) -> dict:
        item = self._prepare(sample, "evaluation")  # one fixed caption per image: metrics repeat exactly
        captions = sample.captions(self.hparams.languages)
        item["all_captions"] = captions
        item["all_languages"] = [lang for lang in self.hparams.languages for _ in sample.captions([lang])]
        if self.hparams.text_features:
            item["all_text_features"] = features_of(sample, [feature_row(sample, c) for c in captions])
        return item

    def _normalized_images(self, items: list[dict]) -> torch.Tensor:
        images = torch.stack([item["image"] for item in items])
        return self.preprocess.normalize(images, out=worker_shared_tensor(images.shape, torch.float32))

    def _collate(self, items: list[dict], evaluation: bool) -> dict:
        batch: dict[str, Any] = {
            "image": self._normalized_images(items),
            "caption": [item["caption"] for item in items],
            "key": [item["key"] for item in items],
        }
        if self.tokenizer is not None:
            batch.update(self.preprocess.tokenize(batch["caption"]))
        if self.hparams.parallel_captions:
            batch["caption_en"] = [item["caption_en"] for item in items]
            batch["caption_ko"] = [item["caption_ko"] for item in items]
        if self.hparams.text_features:
            features = torch.from_numpy(np.stack([item["text_features"] for item in items]))
            batch["text_features"] = features
            # The next sample's caption is the mismatched text of GAN-INT-CLS; rolling by one keeps
            # every pair mismatched without a second pass over the data.
            batch["wrong_text_features"] = features.roll(1, dims=0)
        if evaluation:
            captions = [c for item in items for c in item["all_captions"]]
            batch["all_captions"] = captions
            batch["all_languages"] = [lang for item in items for lang in item["all_languages"]]
            batch["caption_image_index"] = torch.tensor(
                [i for i, item in enumerate(items) for _ in item["all_captions"]], dtype=torch.long
            )
            if self.tokenizer is not None:
                tokens = self.preprocess.tokenize(captions)
                batch["all_input_ids"], batch["all_attention_mask"] = (
                    tokens["input_ids"],
                    tokens["attention_mask"],
                )
            if self.hparams.text_features:
                batch["all_text_features"] = torch.from_numpy(
                    np.concatenate([item["all_text_features"] for item in items])
                )
        return batch

    # ---- loaders -----------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        shards = self._require("train")
        world_size = self.trainer.world_size if self.trainer else 1
        samples = self.num_samples("train")
        if not samples:
            raise ValueError(
                "Set data.train_samples or put a sizes.json with a 'train' count beside the shards."
            )
        batches = max(1, samples // (self.hparams.batch_size * world_size))
        pipeline = shard_pipeline(
            shards,
            self._prepare_train,
            partial(self._collate, evaluation=False),
            self.hparams.batch_size,
            training=True,
            seed=self.hparams.seed,
            epoch=self.position.epoch,
            shuffle_buffer=self.hparams.shuffle_buffer,
            resample=self.hparams.resample,
            skip_policy=self.skip_policy,
            min_decode_size=self.preprocess.image_size if self.hparams.reduced_decode else None,
        )
        # The workers' shares add up to exactly `batches`, so every rank runs the same number of steps
        # whatever the shard sizes (open_clip's recipe), and Lightning knows the epoch length
        # (progress bar, schedules over estimated_stepping_batches).
        pipeline = SizedPipeline(pipeline.compose(worker_share(batches)), batches)
        # each epoch's draws follow from its number; a resumed epoch drops the batches already trained
        return self._loader(pipeline, self.hparams.num_workers, self.position)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")

    def eval_dataloader(self, split: str) -> DataLoader:
        """Every sample of ``split`` exactly once (across ranks and workers), with all its captions."""
        pipeline = shard_pipeline(
            self._require(split),
            self._prepare_eval,
            partial(self._collate, evaluation=True),
            self.hparams.eval_batch_size or self.hparams.batch_size,
            training=False,
            skip_policy=self.skip_policy,
            min_decode_size=self.preprocess.image_size if self.hparams.reduced_decode else None,
        )
        return self._loader(pipeline, self.hparams.num_workers)

    def _loader(self, pipeline, workers: int, position: TrainingPosition | None = None) -> ResumableLoader:
        _ = self.tokenizer  # load once here, not in every worker
        return ResumableLoader(
            pipeline,
            position=position,
            batch_size=None,
            num_workers=workers,
            persistent_workers=workers > 0,
            worker_init_fn=die_with_parent if workers > 0 else None,
            pin_memory=self.hparams.pin_memory and torch.cuda.is_available(),
            # Forked workers inherit the pipeline's closures; under `ddp_spawn` Python would otherwise spawn
            # them too and have to pickle every stage.
            multiprocessing_context=WORKER_START if workers > 0 else None,
        )

    def _require(self, split: str) -> str | list[str]:
        if not self.shards[split]:
            raise ValueError(
                f"No {split} shards: set data.root (a directory of {split}-*.tar shards) or data.{split}_shards."
            )
        return self.shards[split]

    # ---- bookkeeping in the main process -----------------------------------------------------------
    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        skipped = batch.pop(SKIPPED_KEY, {})
        self.skipped.update(skipped)
        self._delivered += len(batch["image"])
        if skipped or self._last_summary is not None:
            self._summarise_skips()
        return super().on_after_batch_transfer(batch, dataloader_idx)

    def _summarise_skips(self) -> None:
        """Log the skip counts by reason now and then while a run skips (across all workers)."""
        total = sum(self.skipped.values())
        now = time.monotonic()
        if self._last_summary is not None:
            last_time, last_total = self._last_summary
            if total == last_total or now - last_time < self.skip_policy.summary_every_s:
                return
        self._last_summary = (now, total)
        log.warning(
            "Data: skipped %d records so far (%.1f%% of %d read): %s",
            total,
            100 * total / (total + self._delivered),
            total + self._delivered,
            describe_skips(self.skipped),
        )

    def state_dict(self) -> dict:
        return {**super().state_dict(), "skipped": dict(self.skipped)}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.skipped = Counter(state_dict.get("skipped", {}))


def batch_size(batch: dict) -> int:
    """Samples in a batch of this DataModule (for Lightning's ThroughputMonitor)."""
    return len(batch["image"])
