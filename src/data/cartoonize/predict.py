"""Cartoonizing as Lightning's prediction loop: the generators run as a LightningModule, a writer callback
turns each batch into shard records, and the Trainer's strategy (one GPU, DDP over GPUs and nodes, CPU)
decides where, so the same command scales out without a process pool of our own."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import Counter, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
import torch
import webdataset as wds
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image
from torch import nn

from src.data.cartoonize.progress import PARTIAL_SUFFIX, ShardRecord, mark_done, output_shard
from src.data.pipeline import describe_skips
from src.data.schema import WebtoonSample

log = logging.getLogger(__name__)


class Cartoonizer(L.LightningModule):
    """The styles' generators; a prediction step turns a batch of photos into one uint8 batch per style."""

    def __init__(self, generators: dict[str, nn.Module]) -> None:
        super().__init__()
        self.generators = nn.ModuleDict(generators)

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        if len(batch["pixels"]) == 0:  # the end-of-shard marker of a shard without a usable image
            return {}
        return {style: self.generators[style].cartoonize(batch["pixels"]).cpu() for style in batch["styles"]}


# style -> (position in the source shard, JPEG encoding under way) of each record of a shard whose batches arrive
ShardRecords = dict[str, list[tuple[int, Future]]]


class StyleShardWriter(BasePredictionWriter):
    """Writes ``out_dir/<style>/<source shard name>`` for every style, keeping the source's sample order.

    JPEG encoding runs on a few threads (PIL releases the GIL), so the accelerator does not wait on it. A shard
    is written once all its batches are in, to a ``.partial`` file renamed when complete, then marked done.
    """

    def __init__(self, out_dir: str | os.PathLike, encode_threads: int = 4, report_every_s: float = 30.0):
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)
        self.encode_threads = encode_threads
        self.report_every_s = report_every_s
        self.images = 0  # source photos cartoonized (in all their pending styles) by this rank
        self.shards = 0
        self.skipped: Counter[str] = Counter()
        self.total_images = 0  # over all ranks, known once prediction ends
        self.seconds = 0.0

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.pool = ThreadPoolExecutor(self.encode_threads, thread_name_prefix="jpeg")
        self.open: dict[str, ShardRecords] = {}  # source shard -> its records so far
        self.started = self.last_report = time.perf_counter()

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: dict[str, torch.Tensor],
        batch_indices: Any,
        batch: dict,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        records = self.open.setdefault(batch["shard"], defaultdict(list))
        for style, cartoons in prediction.items():
            for index, sample, pixels in zip(batch["indices"], batch["samples"], cartoons, strict=True):
                records[style].append((index, self.pool.submit(_encode, sample, style, pixels)))
        self.images += len(batch["indices"])
        if batch["shard_done"]:
            self._finish(batch["shard"], self.open.pop(batch["shard"]), batch, trainer.global_rank)
        if time.perf_counter() - self.last_report >= self.report_every_s:
            self._report(trainer.global_rank)

    def _finish(self, source: str, shard: ShardRecords, batch: dict, rank: int) -> None:
        for style in batch["styles"]:
            records = [future.result() for _, future in sorted(shard[style], key=lambda r: r[0])]
            if len(records) != batch["shard_samples"]:
                raise RuntimeError(
                    f"cartoonize: {source} gave {len(records)} of {batch['shard_samples']} images"
                )
            _write_shard(output_shard(self.out_dir, style, source), records)
            record = ShardRecord(
                source, *batch["source_stamp"], samples=len(records), skipped=batch["skipped"], rank=rank
            )
            mark_done(self.out_dir, style, source, record)
        self.shards += 1
        self.skipped.update(batch["skipped"])

    def _report(self, rank: int) -> None:
        self.last_report = time.perf_counter()
        elapsed = self.last_report - self.started
        log.info(
            "cartoonize (rank %d): %d images in %.0f s, %.2f images/s; %d shards finished; skipped: %s",
            rank,
            self.images,
            elapsed,
            self.images / max(elapsed, 1e-9),
            self.shards,
            describe_skips(self.skipped),
        )

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.pool.shutdown()
        if self.open:
            raise RuntimeError(f"cartoonize: shards left unfinished: {sorted(self.open)}")
        self._report(trainer.global_rank)
        # a collective: also waits until every rank has finished its shards
        images = torch.tensor(float(self.images), device=pl_module.device)
        self.total_images = int(trainer.strategy.reduce(images, reduce_op="sum").item())
        self.seconds = time.perf_counter() - self.started


def _encode(sample: WebtoonSample, style: str, pixels: torch.Tensor) -> dict:
    image = Image.fromarray(pixels.numpy())
    return dataclasses.replace(sample, image=image, style=style).to_record("jpg")


def _write_shard(path: Path, records: list[dict]) -> None:
    """The records as one tar at ``path``, renamed into place when complete; no tar for no records."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not records:
        path.unlink(missing_ok=True)  # a rebuilt source without usable images leaves no stale output behind
        return
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    with open(partial, "wb") as stream, wds.TarWriter(stream, mtime=0) as sink:
        for record in records:
            sink.write(record)
    os.replace(partial, path)
