"""One LightningDataModule for every module: bilingual webdataset shards -> image/caption batches."""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from src.data.pipeline import (
    SKIPPED_KEY,
    SharedEpoch,
    choose_caption,
    expand_shards,
    feature_row,
    features_of,
    shard_pipeline,
)
from src.data.schema import LANGUAGES, WebtoonSample
from src.data.shards import read_sizes

log = logging.getLogger(__name__)


class WebtoonShardDataModule(L.LightningDataModule):
    """Reads ``data.{train,val,test}_shards`` and yields batches for CLIP, the GAN and diffusion fine-tuning.

    A training batch holds ``image`` [B,3,H,W], ``caption`` (one random caption per image, drawn anew
    each epoch from ``languages``), ``key``, and when a tokenizer is set ``input_ids``/``attention_mask``.
    With ``text_features=True`` it also holds the caption's precomputed vector ``text_features`` and
    ``wrong_text_features``, the vector of another sample's caption (the GAN's mismatched text).
    Evaluation batches also carry every caption of every image (``all_captions`` and their tokens with
    ``caption_image_index``), because retrieval treats each caption as a query.
    """

    def __init__(
        self,
        train_shards: str | list[str] | None = None,
        val_shards: str | list[str] | None = None,
        test_shards: str | list[str] | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        image_size: int = 224,
        image_mean: tuple[float, ...] = (0.5, 0.5, 0.5),
        image_std: tuple[float, ...] = (0.5, 0.5, 0.5),
        languages: list[str] = LANGUAGES,
        tokenizer: str | None = None,
        max_length: int = 64,
        text_features: bool = False,
        train_samples: int | None = None,
        shuffle_buffer: int = 1000,
        resample: bool = False,
        seed: int = 0,
        synthetic: dict[str, Any] | None = None,
        precompute_features: dict[str, Any] | None = None,
        pin_memory: bool = True,
    ):
        super().__init__()
        unknown = set(languages) - set(LANGUAGES)
        if unknown or not languages:
            raise ValueError(
                f"data.languages must be a non-empty subset of {list(LANGUAGES)}, got {languages}"
            )
        self.save_hyperparameters(logger=False)
        self.epoch = SharedEpoch()
        self.skipped: Counter[str] = Counter()
        self._tokenizer = None
        self.transform = v2.Compose(
            [
                v2.ToImage(),
                v2.Resize(image_size, antialias=True),
                v2.CenterCrop(image_size),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(list(image_mean), list(image_std)),
            ]
        )

    # ---- setup -------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Write what the configured sources need once: the generated dataset, the precomputed text features."""
        spec = self.hparams.synthetic
        # The tokenizer is written last, so its presence means an earlier generation finished.
        complete = {"train", "val", "test"} <= set(read_sizes(spec["out_dir"])) if spec else True
        if spec and not (complete and (Path(spec["out_dir"]) / "tokenizer" / "vocab.txt").exists()):
            from src.data.synthetic import generate_synthetic_dataset

            log.info("Generating the synthetic bilingual dataset in %s", spec["out_dir"])
            generate_synthetic_dataset(**spec)
        self._precompute_text_features()

    def _precompute_text_features(self) -> None:
        """Encode every caption once (thesis ch. III) when ``precompute_features`` is set; resumes if interrupted."""
        spec = self.hparams.precompute_features
        if not spec or {"train", "val", "test"} <= set(read_sizes(spec["out_dir"])):
            return
        from src.data.text_features import TextFeatureEncoder, precompute_text_features

        log.info("Precomputing text features of %s into %s", spec["shards"], spec["out_dir"])
        precompute_text_features(spec["shards"], spec["out_dir"], TextFeatureEncoder(**spec["encoder"]))

    @property
    def tokenizer(self):
        if self._tokenizer is None and self.hparams.tokenizer:
            from transformers import AutoTokenizer

            from src.utils.hub import from_pretrained

            self._tokenizer = from_pretrained(
                AutoTokenizer.from_pretrained, str(self.hparams.tokenizer), "data.tokenizer"
            )
        return self._tokenizer

    def num_samples(self, split: str) -> int | None:
        """Samples in a split: the setting for train, else ``sizes.json`` beside the shards."""
        if split == "train" and self.hparams.train_samples:
            return int(self.hparams.train_samples)
        shards = self.hparams[f"{split}_shards"]
        if not shards:
            return None
        first = expand_shards(shards)[0]
        return read_sizes(Path(first).parent).get(split)

    # ---- per-sample preparation (runs in the DataLoader workers) -----------------------------------
    def _prepare_train(self, sample: WebtoonSample) -> dict:
        caption, row = choose_caption(sample, self.hparams.languages, random)
        item = {"image": self.transform(sample.image), "caption": caption, "key": sample.key}
        if self.hparams.text_features:
            item["text_features"] = features_of(sample, [row])[0]
        return item

    def _prepare_eval(self, sample: WebtoonSample) -> dict:
        item = self._prepare_train(sample)
        captions = sample.captions(self.hparams.languages)
        item["all_captions"] = captions
        if self.hparams.text_features:
            item["all_text_features"] = features_of(sample, [feature_row(sample, c) for c in captions])
        return item

    def _collate(self, items: list[dict], evaluation: bool) -> dict:
        batch: dict[str, Any] = {
            "image": torch.stack([item["image"] for item in items]),
            "caption": [item["caption"] for item in items],
            "key": [item["key"] for item in items],
        }
        if self.tokenizer is not None:
            batch.update(self._tokenize(batch["caption"]))
        if self.hparams.text_features:
            features = torch.from_numpy(np.stack([item["text_features"] for item in items]))
            batch["text_features"] = features
            # The next sample's caption is the mismatched text of GAN-INT-CLS; rolling by one keeps
            # every pair mismatched without a second pass over the data.
            batch["wrong_text_features"] = features.roll(1, dims=0)
        if evaluation:
            captions = [c for item in items for c in item["all_captions"]]
            batch["all_captions"] = captions
            batch["caption_image_index"] = torch.tensor(
                [i for i, item in enumerate(items) for _ in item["all_captions"]], dtype=torch.long
            )
            if self.tokenizer is not None:
                tokens = self._tokenize(captions)
                batch["all_input_ids"], batch["all_attention_mask"] = (
                    tokens["input_ids"],
                    tokens["attention_mask"],
                )
            if self.hparams.text_features:
                batch["all_text_features"] = torch.from_numpy(
                    np.concatenate([item["all_text_features"] for item in items])
                )
        return batch

    def _tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(
            captions, padding=True, truncation=True, max_length=self.hparams.max_length, return_tensors="pt"
        )
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

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
        workers = self.hparams.num_workers
        pipeline = shard_pipeline(
            shards,
            self._prepare_train,
            partial(self._collate, evaluation=False),
            self.hparams.batch_size,
            training=True,
            seed=self.hparams.seed,
            epoch=self.epoch,
            shuffle_buffer=self.hparams.shuffle_buffer,
            resample=self.hparams.resample,
        )
        # Each worker yields its share of a fixed number of batches, so every rank runs the same
        # number of steps whatever the shard sizes (open_clip's recipe).
        per_worker = math.ceil(batches / max(1, workers))
        # with_length lets Lightning know the epoch (progress bar, schedules over estimated_stepping_batches).
        pipeline = pipeline.with_epoch(per_worker).with_length(per_worker * max(1, workers), silent=True)
        return self._loader(pipeline, workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def _eval_loader(self, split: str) -> DataLoader:
        pipeline = shard_pipeline(
            self._require(split),
            self._prepare_eval,
            partial(self._collate, evaluation=True),
            self.hparams.eval_batch_size or self.hparams.batch_size,
            training=False,
        )
        return self._loader(pipeline, self.hparams.num_workers)

    def _loader(self, pipeline, workers: int) -> DataLoader:
        _ = self.tokenizer  # load once here, not in every worker
        return DataLoader(
            pipeline,
            batch_size=None,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=self.hparams.pin_memory and torch.cuda.is_available(),
        )

    def _require(self, split: str) -> str | list[str]:
        shards = self.hparams[f"{split}_shards"]
        if not shards:
            raise ValueError(
                f"data.{split}_shards is not set: point it at the {split} shards (brace or glob)."
            )
        return shards

    # ---- bookkeeping in the main process -----------------------------------------------------------
    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        self.skipped.update(batch.pop(SKIPPED_KEY, {}))
        if self.trainer is not None and self.trainer.training:
            # Workers of the next epoch read this when they start: a new shard order every epoch.
            self.epoch.set(self.trainer.current_epoch + 1)
        return batch

    def state_dict(self) -> dict:
        return {"skipped": dict(self.skipped)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = Counter(state_dict.get("skipped", {}))
