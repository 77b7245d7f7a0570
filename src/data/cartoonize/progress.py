"""Which output shards are finished: a shard counts as done only once its tar and its record are both in place.

Each cartoonized shard mirrors one source shard (``photo/train-000003.tar`` -> ``hayao/train-000003.tar``). It
is written to a ``.partial`` file and renamed when complete, and only then is its record
``<style>/.done/<shard>.json`` written (also by rename), so an interrupted run leaves either a finished shard
with its record or something a rerun redoes. The record remembers the source file's size and modification
time: a source shard rebuilt since then is cartoonized again.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

DONE_DIR = ".done"
PARTIAL_SUFFIX = ".partial"
_SHARD_NAME = re.compile(r"^(?P<split>.+)-\d+\.tar$")


@dataclass
class ShardRecord:
    """What one finished output shard holds, and which source file it was made from."""

    source: str
    source_bytes: int
    source_mtime_ns: int
    samples: int
    skipped: dict[str, int] = field(default_factory=dict)
    rank: int = 0  # the global rank that wrote it: which process of a cluster run did what


def split_of(shard: str | os.PathLike) -> str:
    """``train`` for ``.../train-000003.tar``; a name without the ``-NNNNNN`` suffix is its own split."""
    name = Path(shard).name
    match = _SHARD_NAME.match(name)
    return match.group("split") if match else Path(name).stem


def output_shard(out_dir: str | os.PathLike, style: str, source: str | os.PathLike) -> Path:
    return Path(out_dir) / style / Path(source).name


def record_path(out_dir: str | os.PathLike, style: str, source: str | os.PathLike) -> Path:
    return Path(out_dir) / style / DONE_DIR / (Path(source).name + ".json")


def source_stamp(source: str | os.PathLike) -> tuple[int, int]:
    stat = os.stat(source)
    return stat.st_size, stat.st_mtime_ns


def read_record(out_dir: str | os.PathLike, style: str, source: str | os.PathLike) -> ShardRecord | None:
    """The record of a finished output shard made from this very source file, else None."""
    path = record_path(out_dir, style, source)
    try:
        record = ShardRecord(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):  # missing, half-written by hand, or from another version
        return None
    if (record.source_bytes, record.source_mtime_ns) != source_stamp(source):
        return None
    if record.samples and not output_shard(out_dir, style, source).is_file():
        return None
    return record


def pending_styles(out_dir: str | os.PathLike, styles: list[str], source: str | os.PathLike) -> list[str]:
    """The styles that still lack a finished shard made from ``source``."""
    return [style for style in styles if read_record(out_dir, style, source) is None]


def write_atomically(path: Path, data: bytes) -> None:
    """Write to ``path.partial``, then rename: readers see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    partial.write_bytes(data)
    os.replace(partial, path)


def mark_done(out_dir: str | os.PathLike, style: str, source: str | os.PathLike, record: ShardRecord) -> None:
    data = json.dumps(asdict(record), indent=2, sort_keys=True).encode()
    write_atomically(record_path(out_dir, style, source), data)
