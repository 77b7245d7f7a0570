"""Writing bilingual samples as webdataset tar shards, with the ``sizes.json`` that readers trust."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import webdataset as wds

from src.data.schema import WebtoonSample

SIZES_FILE = "sizes.json"


def write_shards(
    samples: Iterable[WebtoonSample],
    out_dir: str | os.PathLike,
    split: str,
    samples_per_shard: int = 1000,
    image_format: str = "jpg",
) -> int:
    """Write ``samples`` to ``out_dir/{split}-000000.tar, ...``, record the count in sizes.json, return it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    count = 0
    # mtime=0: the same samples give byte-identical shards (webdataset stamps the clock otherwise).
    with wds.ShardWriter(
        str(out_dir / f"{split}-%06d.tar"), maxcount=samples_per_shard, verbose=0, mtime=0
    ) as sink:
        for sample in samples:
            sink.write(sample.to_record(image_format))
            count += 1
    if count == 0:  # ShardWriter opens its first tar eagerly; an empty split keeps no empty shard
        remove_split_shards(out_dir, split)
    update_sizes(out_dir, {split: count})
    return count


def update_sizes(out_dir: str | os.PathLike, counts: dict[str, int]) -> None:
    """Merge ``counts`` into ``out_dir/sizes.json`` (split -> number of samples)."""
    path = Path(out_dir) / SIZES_FILE
    sizes = json.loads(path.read_text()) if path.exists() else {}
    sizes.update(counts)
    path.write_text(json.dumps(sizes, indent=2, sort_keys=True) + "\n")


def read_sizes(shard_dir: str | os.PathLike) -> dict[str, int]:
    path = Path(shard_dir) / SIZES_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def remove_split_shards(out_dir: str | os.PathLike, split: str) -> None:
    """Delete ``out_dir/{split}-NNNNNN.tar`` left by an earlier run, so readers never glob stale shards."""
    for path in Path(out_dir).glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
        path.unlink()


def forget_splits(out_dir: str | os.PathLike, splits: Iterable[str]) -> None:
    """Drop ``splits`` from ``out_dir/sizes.json`` (removing the file when nothing is left)."""
    path, forgotten = Path(out_dir) / SIZES_FILE, set(splits)
    sizes = {split: n for split, n in read_sizes(out_dir).items() if split not in forgotten}
    if sizes:
        path.write_text(json.dumps(sizes, indent=2, sort_keys=True) + "\n")
    elif path.exists():
        path.unlink()
