"""Source shards -> batches of same-size photos, one shard at a time, for the cartoonizing prediction loop.

The stages are webdataset's (shard list -> split by rank -> split by loader worker -> tar records) and ours:
skip shards whose outputs are finished, decode each record into a :class:`WebtoonSample` (corrupt ones are
counted and dropped), resize it as the published CartoonGAN test does, and group same-size photos into batches.
Grouping by size instead of padding keeps every output equal to the one-image-at-a-time result (instance
norm sees only the image). Batches never mix shards, and each shard's last batch says so and carries the
shard's counts, so the writer knows when a shard is complete.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from functools import partial
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from src.data.cartoonize.progress import pending_styles, source_stamp
from src.data.pipeline import CorruptSample, decode_record

log = logging.getLogger(__name__)

BUFFERED_BATCHES = 4  # photos waiting for same-size company, in batches, before a partial batch is sent


def resize_longer_side(image: Image.Image, load_size: int | None) -> Image.Image:
    """The published CartoonGAN test's resize: longer side to ``load_size`` (bicubic, up or down), the other
    side scaled and truncated; ``None`` keeps the image as it is."""
    if not load_size:
        return image
    width, height = image.size
    ratio = width / height
    # the same arithmetic as the published script, so sizes match it to the pixel
    size = (load_size, int(load_size / ratio)) if ratio > 1 else (int(load_size * ratio), load_size)
    return image.resize(size, Image.Resampling.BICUBIC)


def photo_batches(
    sources: list[str],
    out_dir: str | os.PathLike,
    styles: list[str],
    load_size: int | None,
    batch_size: int,
    num_workers: int = 0,
) -> DataLoader:
    """A loader of same-size photo batches from the source shards that some style still lacks.

    Each rank takes every world_size-th shard of the full list (not of the unfinished ones, which ranks could
    see differently while others write) and skips the finished ones itself.
    """
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(sources),
        wds.split_by_node,
        wds.split_by_worker,
        partial(_unfinished, out_dir=out_dir, styles=styles),
        partial(_shard_batches, load_size=load_size, batch_size=batch_size),
    )
    # batch_size=None: the pipeline batches (by size, within a shard) itself
    return DataLoader(pipeline, batch_size=None, num_workers=num_workers)


def _unfinished(sources: Iterable[dict], out_dir: str | os.PathLike, styles: list[str]) -> Iterator[dict]:
    for source in sources:
        pending = pending_styles(out_dir, styles, source["url"])
        if pending:
            yield {**source, "styles": pending}


def _shard_batches(sources: Iterable[dict], load_size: int | None, batch_size: int) -> Iterator[dict]:
    for source in sources:
        yield from shard_batches(source["url"], source["styles"], load_size, batch_size)


def shard_batches(url: str, styles: list[str], load_size: int | None, batch_size: int) -> Iterator[dict]:
    """One shard's photos in same-size batches; the last batch (empty if the shard had no usable image) is
    marked ``shard_done`` and carries the shard's sample and skip counts."""
    skipped: Counter[str] = Counter()
    buckets: dict[tuple[int, int], list] = defaultdict(list)
    samples = 0
    stamp = source_stamp(url)  # before reading: a shard rebuilt meanwhile must not pass for the one read

    def unreadable_tar(error: Exception) -> bool:
        skipped["unreadable_tar"] += 1
        log.warning("cartoonize: %s: unreadable tar data (%r); its remaining records are skipped", url, error)
        return False  # a broken tar stream cannot be resumed: end this shard, keep what was read

    for index, record in enumerate(wds.tarfile_samples([{"url": url}], handler=unreadable_tar)):
        try:
            sample = decode_record(record)
        except CorruptSample as error:
            skipped[error.reason] += 1
            log.warning("cartoonize: %s: skipping %s", url, error)
            continue
        photo = resize_longer_side(sample.image, load_size)
        # the pixels travel in the batch tensor; the sample keeps key, captions and ids for the writer
        bucket = buckets[photo.size]
        bucket.append((index, np.asarray(photo), dataclasses.replace(sample, image=None)))
        samples += 1
        if len(bucket) == batch_size:
            yield _batch(url, styles, buckets.pop(photo.size))
        elif sum(map(len, buckets.values())) >= BUFFERED_BATCHES * batch_size:
            # many sizes, few photos of each: send the fullest group rather than hold a whole shard in memory
            yield _batch(url, styles, buckets.pop(max(buckets, key=lambda size: len(buckets[size]))))
    leftovers = [bucket for bucket in buckets.values() if bucket] or [[]]
    for bucket in leftovers[:-1]:
        yield _batch(url, styles, bucket)
    yield _batch(url, styles, leftovers[-1]) | {
        "shard_done": True,
        "shard_samples": samples,
        "skipped": dict(skipped),
        "source_stamp": stamp,
    }


def _batch(url: str, styles: list[str], items: list[tuple[int, np.ndarray, Any]]) -> dict:
    pixels = (
        torch.from_numpy(np.stack([pixels for _, pixels, _ in items]))
        if items
        else torch.empty(0, 0, 0, 3, dtype=torch.uint8)
    )
    return {
        "shard": url,
        "styles": styles,
        "pixels": pixels,  # uint8 RGB [N, H, W, 3]
        "indices": [index for index, _, _ in items],  # record positions in the source shard
        "samples": [sample for _, _, sample in items],
        "shard_done": False,
    }
