"""The webdataset pipeline, stage by stage: shards -> samples -> decoded bilingual records -> batches.

Every module reads data through :func:`shard_pipeline`. Bad records never stop a healthy run: each stage that
can meet one drops it and counts it by reason in a :class:`SkipCounter`, and the counts travel to the main
process inside the batches (DataLoader workers are separate processes, so a shared counter would not).
A run whose data has stopped yielding anything usable is not healthy, though: the counter applies a
:class:`SkipPolicy` and stops the run with one error that names the counts and the setting to change,
instead of letting an endlessly repeated training stream spin.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from glob import glob
from pathlib import Path

import braceexpand
import numpy as np
import webdataset as wds
from PIL import Image

from src.data.position import SharedEpoch
from src.data.schema import IMAGE_EXTENSIONS, WebtoonSample, decode_npy
from src.utils.seeding import derived_seed

log = logging.getLogger(__name__)

SKIPPED_KEY = "skipped"

# What to check first when a reason dominates; shown in the error that stops a starving run.
SKIP_HINTS = {
    "no_caption": "no record has a caption in data.languages (COCO shards built without coco.korean_json "
    "have no Korean captions): set data.languages to a language the shards have",
    "no_text_features": "the shards have no txtfeat.npy: point data.*_shards at the output of "
    "precompute_text_features.py",
    "unreadable_tar": "the shard files are not readable tar archives: rebuild them with prepare_data.py",
    "bad_image": "the image bytes do not decode: check the shards' image files",
    "no_parallel_captions": "data.parallel_captions needs records with both English and Korean captions "
    "(COCO shards built with coco.korean_json)",
}


class CorruptSample(ValueError):
    """A record that cannot become a training item; ``reason`` names the counter it goes to."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class DataStarvationError(RuntimeError):
    """The data pipeline keeps skipping records: continuing would spin or train on a sliver of the data."""


@dataclass(frozen=True)
class SkipPolicy:
    """How much skipping a healthy run tolerates (``data.skip_policy``)."""

    # Records read in a row without one usable sample: past this, the stream cannot recover.
    max_records_without_sample: int = 1000
    # Share of skipped records over each ``window`` records read; 1.0 turns the check off.
    max_skip_ratio: float = 0.5
    window: int = 2000
    # Seconds between the skip summaries that the main process logs while a run skips (0: every batch).
    summary_every_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_records_without_sample < 1 or self.window < 1:
            raise ValueError("skip_policy.max_records_without_sample and skip_policy.window must be >= 1")
        if not 0.0 <= self.max_skip_ratio <= 1.0:
            raise ValueError(f"skip_policy.max_skip_ratio must be in [0, 1], got {self.max_skip_ratio}")


def describe_skips(counts: dict[str, int]) -> str:
    """``no_caption=12, bad_image=1`` (largest first)."""
    return ", ".join(f"{reason}={n}" for reason, n in Counter(counts).most_common()) or "none"


class SkipCounter:
    """Counts read and dropped records by reason inside one process and enforces the :class:`SkipPolicy`.

    :meth:`drain` hands the counts since the last batch to that batch.
    """

    def __init__(self, policy: SkipPolicy | None = None) -> None:
        self.policy = policy or SkipPolicy()
        self.pending: Counter[str] = Counter()
        self.total: Counter[str] = Counter()
        self.records_read = 0
        self._since_last_sample = 0
        self._window_read = 0
        self._window_skipped = 0

    def read(self) -> None:
        """A raw record came out of a tar file (usable or not)."""
        self.records_read += 1

    def passed(self) -> None:
        self._since_last_sample = 0
        self._tick(skipped=False)

    def skip(self, reason: str, key: str, detail: str = "") -> None:
        log.debug("skipping sample %s (%s) %s", key, reason, detail)
        self.pending[reason] += 1
        self.total[reason] += 1
        self._since_last_sample += 1
        if self._since_last_sample >= self.policy.max_records_without_sample:
            raise self._starvation(
                f"none of the last {self._since_last_sample} records was usable",
                "data.skip_policy.max_records_without_sample",
            )
        self._tick(skipped=True)

    def _tick(self, skipped: bool) -> None:
        self._window_read += 1
        self._window_skipped += skipped
        if self._window_read < self.policy.window:
            return
        ratio = self._window_skipped / self._window_read
        self._window_read = self._window_skipped = 0
        if ratio > self.policy.max_skip_ratio:
            raise self._starvation(
                f"{ratio:.0%} of the last {self.policy.window} records were skipped "
                f"(limit {self.policy.max_skip_ratio:.0%})",
                "data.skip_policy.max_skip_ratio",
            )

    def _starvation(self, what: str, setting: str) -> DataStarvationError:
        hints = [SKIP_HINTS[r] for r, _ in self.total.most_common() if r in SKIP_HINTS][:2]
        return DataStarvationError(
            f"The data pipeline stopped the run: {what}. Skipped so far by reason: "
            f"{describe_skips(self.total)}. "
            + (f"Likely cause: {'; '.join(hints)}. " if hints else "")
            + f"To tolerate more, raise {setting}."
        )

    def tar_error(self, error: Exception) -> bool:
        """webdataset handler for unreadable tar members: count, then keep reading."""
        self.skip("unreadable_tar", error.args[-1] if error.args else "", repr(error))
        return True

    def drain(self) -> dict[str, int]:
        counts, self.pending = dict(self.pending), Counter()
        return counts


def expand_shards(patterns: str | Path | Iterable[str | Path]) -> list[str]:
    """Brace (``train-{000000..000007}.tar``) and glob (``train-*.tar``) patterns -> sorted shard paths."""
    if isinstance(patterns, str | Path):
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
            "Write shards with `python prepare_data.py` and point data.root or data.*_shards at them."
        )
    return urls


def decode_record(record: dict, min_size: int | None = None) -> WebtoonSample:
    """A raw webdataset record (our schema, or img2dataset's ``.jpg``+``.txt``+``.json``) -> WebtoonSample.

    With ``min_size`` a JPEG is decoded at the smallest of its DCT scales (1/2, 1/4, 1/8) whose both sides stay at
    least ``min_size``: a 640x480 photo for a 224 px model decodes at 320x240, about twice as fast.
    """
    key = record.get("__key__", "?")
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in record), None)
    if image_ext is None:
        raise CorruptSample("no_image", key)
    try:
        image = Image.open(io.BytesIO(record[image_ext]))
        if min_size and image.format == "JPEG":
            image.draft("RGB", (min_size, min_size))  # before the decode: it picks the scale to decode at
        image = image.convert("RGB")  # forces the full decode, so truncated bytes fail here
    except Exception as error:  # PIL raises many types for bad bytes
        raise CorruptSample("bad_image", f"{key}: {error}") from error
    try:
        meta = json.loads(record["json"]) if "json" in record else {}
        if not isinstance(meta, dict):
            raise ValueError("metadata is not an object")
        txt = record["txt"].decode("utf-8") if "txt" in record else None
        captions_en, captions_ko = read_captions(meta, txt)
    except ValueError as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CorruptSample("bad_json", f"{key}: {error}") from error
    try:
        features = decode_npy(record["txtfeat.npy"]) if "txtfeat.npy" in record else None
    except ValueError as error:
        raise CorruptSample("bad_text_features", f"{key}: {error}") from error
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
    captions_en = meta.get("captions_en") or []
    if txt is not None:  # img2dataset keeps its one caption in .txt
        captions_en = [*captions_en, txt.strip()]
    elif not captions_en and isinstance(meta.get("caption"), str):
        captions_en = [meta["caption"]]
    captions_ko = meta.get("captions_ko", meta.get("caption_ko")) or []
    for name, captions in (("captions_en", captions_en), ("captions_ko", captions_ko)):
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise ValueError(f"{name} must be a list of strings")
    return list(captions_en), list(captions_ko)


def count_records(counter: SkipCounter) -> Callable[[Iterable[dict]], Iterator[dict]]:
    def stage(records: Iterable[dict]) -> Iterator[dict]:
        for record in records:
            counter.read()
            yield record

    return stage


def decode_stage(
    prepare: Callable[[WebtoonSample], dict], counter: SkipCounter, min_size: int | None = None
) -> Callable[[Iterable[dict]], Iterator[dict]]:
    """Decode each record (JPEGs at reduced size down to ``min_size``, see :func:`decode_record`) and ``prepare``
    it for the model; corrupt records are counted and dropped."""

    def stage(records: Iterable[dict]) -> Iterator[dict]:
        for record in records:
            try:
                item = prepare(decode_record(record, min_size))
            except CorruptSample as error:
                counter.skip(error.reason, record.get("__key__", "?"), str(error))
                continue
            counter.passed()
            yield item

    return stage


def shuffled_shards(seed: int, epoch: SharedEpoch) -> Callable[[Iterable[str]], Iterator[str]]:
    """Shuffle the shard list with the same order on every rank (seed + epoch), a new order each epoch."""

    def stage(urls: Iterable[str]) -> Iterator[str]:
        urls = list(urls)
        random.Random(seed + epoch.get()).shuffle(urls)
        yield from urls

    return stage


def repeat_shards(urls: Iterable[str]) -> Iterator[str]:
    # Endless passes over the shards; the epoch length is set by worker_share, not by the data.
    urls = list(urls)
    while urls:
        yield from urls


def stop_on_empty_passes(
    counter: SkipCounter, shards_per_pass: int
) -> Callable[[Iterable[str]], Iterator[str]]:
    """Fail an endless shard stream after a whole pass of shards that held no record at all (empty tars)."""

    def stage(urls: Iterable[str]) -> Iterator[str]:
        read_at_pass_start = counter.records_read
        for count, url in enumerate(urls, start=1):
            yield url
            if count % shards_per_pass == 0:
                if counter.records_read == read_at_pass_start:
                    raise DataStarvationError(
                        f"{shards_per_pass} shards in a row held no record (empty or filtered tar files; "
                        f"skipped so far: {describe_skips(counter.total)}). Rebuild the shards or point "
                        "data.root / data.*_shards at others."
                    )
                read_at_pass_start = counter.records_read

    return stage


def shuffled_samples(
    bufsize: int, seed: int, epoch: SharedEpoch
) -> Callable[[Iterable[dict]], Iterator[dict]]:
    """webdataset's buffer shuffle, seeded from (seed, epoch, rank, worker): the same order however the run got
    to this epoch (a resumed run's fresh workers included)."""

    def stage(samples: Iterable[dict]) -> Iterator[dict]:
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = random.Random(derived_seed(seed, "samples", epoch.get(), rank, worker))
        yield from wds.shuffle(bufsize, initial=min(bufsize, 100), rng=rng)(iter(samples))

    return stage


def resampled_shards(seed: int, epoch: SharedEpoch) -> Callable[[Iterable[str]], Iterator[str]]:
    """Shards drawn with replacement, endlessly, in an order set by (seed, epoch) (webdataset's
    ``ResampledShards`` counts epochs itself, from 0 again in a resumed run)."""

    def stage(urls: Iterable[str]) -> Iterator[str]:
        urls = list(urls)
        rng = random.Random(derived_seed(seed, "shards", epoch.get()))
        while urls:
            yield rng.choice(urls)

    return stage


def draw_rng(*parts: object) -> random.Random:
    """A generator for one sample's draws, seeded from where they happen (e.g. seed, epoch, sample key)."""
    return random.Random(derived_seed(*parts))


def worker_share(num_batches: int) -> Callable[[Iterable[dict]], Iterator[dict]]:
    """Yield this DataLoader worker's share of ``num_batches``: the shares of all workers add up exactly."""

    def stage(batches: Iterable[dict]) -> Iterator[dict]:
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        workers, worker_id = (info.num_workers, info.id) if info is not None else (1, 0)
        share = num_batches // workers + (worker_id < num_batches % workers)
        yield from itertools.islice(batches, share)

    return stage


def attach_skipped(counter: SkipCounter) -> Callable[[Iterable[dict]], Iterator[dict]]:
    def stage(batches: Iterable[dict]) -> Iterator[dict]:
        for batch in batches:
            batch[SKIPPED_KEY] = counter.drain()
            yield batch

    return stage


class SizedPipeline(wds.DataPipeline):
    """A pipeline that tells the DataLoader its number of batches. webdataset's ``with_length`` builds a class on
    the fly, which cannot be pickled into the workers of a spawned process (``trainer=ddp_cpu``); this one can."""

    def __init__(self, pipeline: wds.DataPipeline, size: int) -> None:
        super().__init__(pipeline.pipeline)
        self.size = size

    def __len__(self) -> int:
        return self.size


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
    skip_policy: SkipPolicy | None = None,
    sample_stage: Callable[[Callable, SkipCounter], Callable] | None = None,
    min_decode_size: int | None = None,
) -> wds.DataPipeline:
    """Training: (resampled | epoch-shuffled, repeated) shards -> split by node/worker -> shuffle -> batch.

    ``sample_stage(prepare, counter)`` turns tar records into samples; by default :func:`decode_stage` (each
    record decoded into a :class:`WebtoonSample` for ``prepare``, JPEGs at reduced size down to
    ``min_decode_size``), a stage of raw records for data with members of its own (control images).

    Evaluation reads every sample exactly once across all ranks and workers and keeps the last partial
    batch. Training repeats its shards endlessly; the caller bounds an epoch with :func:`worker_share` so
    that every rank runs the same number of steps (uneven ranks hang DDP).
    """
    urls = expand_shards(shards)
    counter = SkipCounter(skip_policy)
    epoch = epoch or SharedEpoch()
    if training and resample:
        stages: list = [wds.SimpleShardList(urls), resampled_shards(seed, epoch)]
    elif training:
        stages = [wds.SimpleShardList(urls), shuffled_shards(seed, epoch), repeat_shards]
    else:
        stages = [wds.SimpleShardList(urls)]
    stages += [wds.split_by_node, wds.split_by_worker]
    if training:
        stages.append(stop_on_empty_passes(counter, len(urls)))
    stages += [wds.tarfile_to_samples(handler=counter.tar_error), count_records(counter)]
    if training:
        stages.append(shuffled_samples(shuffle_buffer, seed, epoch))
    stages += [
        sample_stage(prepare, counter) if sample_stage else decode_stage(prepare, counter, min_decode_size),
        wds.batched(batch_size, collation_fn=collate, partial=not training),
        attach_skipped(counter),
    ]
    return wds.DataPipeline(*stages)


def choose_caption(sample: WebtoonSample, languages: list[str], rng: random.Random) -> tuple[str, int]:
    """A random caption in the asked languages and its row in the sample's text features."""
    candidates = sample.captions(languages)
    if not candidates:
        raise CorruptSample("no_caption", f"{sample.key} has no caption in {languages}")
    caption = rng.choice(candidates)
    return caption, feature_row(sample, caption)


def choose_parallel_captions(sample: WebtoonSample, rng: random.Random) -> tuple[str, str]:
    """An English caption and a Korean caption of the same image: caption ``i`` of one language with caption ``i``
    of the other when both lists are as long (the demo's templates are parallel that way), else at random."""
    english, korean = sample.captions(["en"]), sample.captions(["ko"])
    if not english or not korean:
        raise CorruptSample("no_parallel_captions", f"{sample.key} lacks English or Korean captions")
    if len(english) == len(korean):
        row = rng.randrange(len(english))
        return english[row], korean[row]
    return rng.choice(english), rng.choice(korean)


def feature_row(sample: WebtoonSample, caption: str) -> int:
    """Row of ``caption`` in ``sample.text_features`` (-1 when the sample carries none)."""
    if sample.text_features is None:
        return -1
    order = sample.feature_captions or sample.captions()
    if caption not in order:
        raise CorruptSample("bad_text_features", f"{sample.key}: no feature row for caption {caption!r}")
    return order.index(caption)


def features_of(sample: WebtoonSample, rows: list[int]) -> np.ndarray:
    """The sample's feature rows as float32 [len(rows), dim]."""
    if sample.text_features is None:
        raise CorruptSample(
            "no_text_features", f"{sample.key} has no txtfeat.npy; run precompute_text_features.py"
        )
    features = sample.text_features
    if features.ndim != 2 or any(not 0 <= row < len(features) for row in rows):
        raise CorruptSample(
            "bad_text_features", f"{sample.key}: rows {rows} not in features of shape {features.shape}"
        )
    return np.asarray(features[rows], dtype=np.float32)
