"""Writing bilingual samples as webdataset tar shards, with the ``sizes.json`` that readers trust."""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import webdataset as wds

from src.data.schema import WebtoonSample

SIZES_FILE = "sizes.json"
SHARD_NAME = "{split}-%06d.tar"  # train-000000.tar, ...: the split is what comes before the last dash


def split_of(shard_name: str) -> str:
    """``train-000003.tar`` -> ``train``: the sizes.json key of a shard named by :func:`write_shards`."""
    stem = shard_name.split(".", 1)[0]
    return stem.rsplit("-", 1)[0] if "-" in stem else stem


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
        str(out_dir / SHARD_NAME.format(split=split)), maxcount=samples_per_shard, verbose=0, mtime=0
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


def read_records(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Raw records of a tar shard in order (``{"__key__", ext: bytes}``); a damaged or truncated tar raises."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    path = Path(path)
    with open(path, "rb") as stream:
        yield from group_by_keys(tar_file_expander([{"url": str(path), "stream": stream}]))
    check_end_of_archive(path)


@dataclass(frozen=True)
class TarMember:
    """Where a member's bytes lie in an uncompressed tar: ``size`` bytes from ``offset``, past its headers."""

    name: str
    offset: int
    size: int


# webdataset's default: members named like __meta__ (or inside __meta__/) are no part of any record
_WEBDATASET_META = re.compile(r"__[^/]*__($|/)")


def read_records_with_members(
    path: str | os.PathLike,
) -> Iterator[tuple[dict[str, Any], dict[str, TarMember]]]:
    """Each raw record of an uncompressed tar shard as :func:`read_records` gives it, with where its members
    lie (extension -> :class:`TarMember`), so that a member is read back later by one seek, without a scan."""
    from webdataset.tariterators import base_plus_ext, group_by_keys

    path = Path(path)
    members: dict[tuple[str, str], TarMember] = {}

    def files() -> Iterator[dict[str, Any]]:
        # "r|": a plain stream of 512-byte blocks, whose offsets are the file's (not a gzip stream's)
        with tarfile.open(path, mode="r|") as archive:
            for info in archive:
                if not info.isreg() or _WEBDATASET_META.match(info.name):
                    continue
                prefix, suffix = base_plus_ext(info.name)
                if prefix is not None:  # grouped under the same (key, lower-cased extension) as webdataset
                    members[prefix, suffix.lower()] = TarMember(info.name, info.offset_data, info.size)
                yield {"fname": info.name, "data": archive.extractfile(info).read(), "__url__": str(path)}
                archive.members = []  # a stream keeps every header otherwise

    for record in group_by_keys(files()):
        key = record["__key__"]
        yield record, {ext: members.pop((key, ext)) for ext in record if not ext.startswith("__")}
    check_end_of_archive(path)


def count_records(path: str | os.PathLike) -> int:
    return sum(1 for _ in read_records(path))


def check_end_of_archive(path: str | os.PathLike) -> None:
    """Raise unless the members are followed by tar's end-of-archive marker (two zero blocks).

    Python's tarfile stops quietly at a truncated header, so a shard cut short would otherwise pass as complete.
    """
    with tarfile.open(path, mode="r|") as archive:
        for _ in archive:
            pass
        end = archive.offset
    with open(path, "rb") as raw:
        raw.seek(end)
        marker = raw.read(2 * tarfile.BLOCKSIZE)
    if len(marker) < 2 * tarfile.BLOCKSIZE or marker.strip(b"\0"):
        raise tarfile.ReadError(f"{path} ends without tar's end-of-archive marker: the file is truncated")
