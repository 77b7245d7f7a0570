"""The webdataset pipeline, stage by stage: shards -> samples -> decoded bilingual records -> batches.

Every module reads data through :func:`shard_pipeline`. Bad records never stop a run: each stage that
can meet one drops it, counts it by reason in a :class:`SkipCounter`, and the counts travel to the main
process inside the batches (DataLoader workers are separate processes, so a shared counter would not).
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from glob import glob
from pathlib import Path

import braceexpand
import numpy as np
import webdataset as wds
from PIL import Image

from src.data.schema import IMAGE_EXTENSIONS, WebtoonSample, decode_npy

log = logging.getLogger(__name__)

SKIPPED_KEY = "skipped"


class CorruptSample(ValueError):
    """A record that cannot become a :class:`WebtoonSample`; ``reason`` names the counter it goes to."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class SkipCounter:
    """Counts dropped records by reason inside one process; :meth:`drain` hands them to the next batch."""

    def __init__(self) -> None:
        self.pending: Counter[str] = Counter()

    def skip(self, reason: str, key: str, detail: str = "") -> None:
        if not self.pending[reason]:
            log.warning("skipping corrupt sample %s (%s) %s", key, reason, detail)
        self.pending[reason] += 1

    def tar_error(self, error: Exception) -> bool:
        """webdataset handler for unreadable tar members: count, then keep reading."""
        self.skip("unreadable_tar", getattr(error, "args", [""])[-1] if error.args else "", repr(error))
        return True

    def drain(self) -> dict[str, int]:
        counts, self.pending = dict(self.pending), Counter()
        return counts


class SharedEpoch:
    """An epoch number shared with DataLoader workers, so shard order changes every epoch (as in open_clip)."""

    def __init__(self, epoch: int = 0):
        self.value = multiprocessing.Value("i", epoch)

    def set(self, epoch: int) -> None:
        self.value.value = epoch

    def get(self) -> int:
        return self.value.value


def expand_shards(patterns: str | Iterable[str]) -> list[str]:
    """Brace (``train-{000000..000007}.tar``) and glob (``train-*.tar``) patterns -> sorted shard paths."""
    if isinstance(patterns, str):
        patterns = [patterns]
    urls: list[str] = []
    for pattern in patterns:
        for expanded in braceexpand.braceexpand(str(pattern)):
            matches = sorted(glob(expanded)) if any(c in expanded for c in "*?[") else [expanded]
            urls += matches
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).exists()]
    if not urls or missing:
        raise FileNotFoundError(
            f"No shards found for {patterns!r}{f' (missing: {missing[:3]})' if missing else ''}. "
            "Write shards with `python prepare_data.py` and point data.*_shards at them."
        )
    return urls


def decode_record(record: dict) -> WebtoonSample:
    """A raw webdataset record (our schema, or img2dataset's ``.jpg``+``.txt``+``.json``) -> WebtoonSample."""
    key = record.get("__key__", "?")
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in record), None)
    if image_ext is None:
        raise CorruptSample("no_image", key)
    try:
        image = Image.open(io.BytesIO(record[image_ext]))
        image = image.convert("RGB")  # forces the full decode, so truncated bytes fail here
    except Exception as error:  # PIL raises many types for bad bytes
        raise CorruptSample("bad_image", f"{key}: {error}") from error
    try:
        meta = json.loads(record["json"]) if "json" in record else {}
        if not isinstance(meta, dict):
            raise ValueError("metadata is not an object")
    except ValueError as error:
        raise CorruptSample("bad_json", f"{key}: {error}") from error
    txt = record["txt"].decode("utf-8") if "txt" in record else None
    captions_en, captions_ko = read_captions(meta, txt)
    features = decode_npy(record["txtfeat.npy"]) if "txtfeat.npy" in record else None
    return WebtoonSample(
        key=key,
        image=image,
        captions_en=captions_en,
        captions_ko=captions_ko,
        style=meta.get("style", "photo"),
        image_id=meta.get("image_id", meta.get("key")),
        text_features=features,
        feature_captions=meta.get("feature_captions"),
    )


def read_captions(meta: dict, txt: str | None = None) -> tuple[list[str], list[str]]:
    """English and Korean captions of a record: our json, or img2dataset's ``.txt`` / json ``caption``."""
    captions_en = list(meta.get("captions_en") or [])
    if txt is not None:  # img2dataset keeps its one caption in .txt
        captions_en.append(txt.strip())
    elif not captions_en and isinstance(meta.get("caption"), str):
        captions_en.append(meta["caption"])
    captions_ko = list(meta.get("captions_ko", meta.get("caption_ko")) or [])
    return captions_en, captions_ko


def decode_stage(
    prepare: Callable[[WebtoonSample], dict], counter: SkipCounter
) -> Callable[[Iterable[dict]], Iterator[dict]]:
    """Decode each record and ``prepare`` it for the model; corrupt records are counted and dropped."""

    def stage(records: Iterable[dict]) -> Iterator[dict]:
        for record in records:
            try:
                yield prepare(decode_record(record))
            except CorruptSample as error:
                counter.skip(error.reason, record.get("__key__", "?"), str(error))

    return stage


def shuffled_shards(seed: int, epoch: SharedEpoch) -> Callable[[Iterable[str]], Iterator[str]]:
    """Shuffle the shard list with the same order on every rank (seed + epoch), a new order each epoch."""

    def stage(urls: Iterable[str]) -> Iterator[str]:
        urls = list(urls)
        random.Random(seed + epoch.get()).shuffle(urls)
        yield from urls

    return stage


def shuffled_samples(
    bufsize: int, seed: int, epoch: SharedEpoch
) -> Callable[[Iterable[dict]], Iterator[dict]]:
    """webdataset's buffer shuffle, seeded per worker and epoch (torch gives each worker its own seed)."""

    def stage(samples: Iterable[dict]) -> Iterator[dict]:
        import torch

        rng = random.Random(wds.utils.make_seed(seed, epoch.get(), torch.initial_seed()))
        yield from wds.shuffle(bufsize, initial=min(bufsize, 100), rng=rng)(iter(samples))

    return stage


def attach_skipped(counter: SkipCounter) -> Callable[[Iterable[dict]], Iterator[dict]]:
    def stage(batches: Iterable[dict]) -> Iterator[dict]:
        for batch in batches:
            batch[SKIPPED_KEY] = counter.drain()
            yield batch

    return stage


def shard_pipeline(
    shards: str | list[str],
    prepare: Callable[[WebtoonSample], dict],
    collate: Callable[[list[dict]], dict],
    batch_size: int,
    training: bool,
    seed: int = 0,
    epoch: SharedEpoch | None = None,
    shuffle_buffer: int = 1000,
    resample: bool = False,
) -> wds.DataPipeline:
    """Training: (resampled | epoch-shuffled) shards -> split by node/worker -> shuffle -> batch.

    Evaluation reads every sample exactly once across all ranks and workers and keeps the last
    partial batch. Training repeats its shards endlessly; the caller bounds an epoch with
    ``with_epoch`` so that every rank runs the same number of steps (uneven ranks hang DDP).
    """
    urls = expand_shards(shards)
    counter = SkipCounter()
    if training and resample:
        stages: list = [wds.ResampledShards(urls, seed=seed, deterministic=True)]
    elif training:
        stages = [wds.SimpleShardList(urls), shuffled_shards(seed, epoch or SharedEpoch()), _repeat]
    else:
        stages = [wds.SimpleShardList(urls)]
    stages += [
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=counter.tar_error),
    ]
    if training:
        stages.append(shuffled_samples(shuffle_buffer, seed, epoch or SharedEpoch()))
    stages += [
        decode_stage(prepare, counter),
        wds.batched(batch_size, collation_fn=collate, partial=not training),
        attach_skipped(counter),
    ]
    return wds.DataPipeline(*stages)


def _repeat(urls: Iterable[str]) -> Iterator[str]:
    # Endless passes over this rank's shards; the epoch length is set by with_epoch, not by the data.
    urls = list(urls)
    while urls:
        yield from urls


def choose_caption(sample: WebtoonSample, languages: list[str], rng: random.Random) -> tuple[str, int]:
    """A random caption in the asked languages and its row in the sample's text features."""
    candidates = sample.captions(languages)
    if not candidates:
        raise CorruptSample("no_caption", f"{sample.key} has no caption in {languages}")
    caption = rng.choice(candidates)
    return caption, feature_row(sample, caption)


def feature_row(sample: WebtoonSample, caption: str) -> int:
    """Row of ``caption`` in ``sample.text_features`` (-1 when the sample carries none)."""
    if sample.text_features is None:
        return -1
    order = sample.feature_captions or sample.captions()
    return order.index(caption)


def features_of(sample: WebtoonSample, rows: list[int]) -> np.ndarray:
    if sample.text_features is None:
        raise CorruptSample(
            "no_text_features", f"{sample.key} has no txtfeat.npy; run precompute_text_features.py"
        )
    return np.asarray(sample.text_features[rows], dtype=np.float32)
