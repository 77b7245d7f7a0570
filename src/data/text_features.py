"""Sentence vectors of every caption, computed once and stored beside the images (thesis chapter III).

The thesis feeds the GAN the last hidden state at [CLS] of pretrained multilingual BERT. Encoding 8M captions
every epoch would cost more than the GAN itself, so :func:`precompute_text_features` rewrites each shard with a
``<key>.txtfeat.npy`` per sample and records the encoder in ``text_features.json``, so generation later encodes
new captions with exactly the same network.

Row alignment (the contract between writer and readers): row ``i`` of ``txtfeat.npy`` [n, dim] float16 is the
vector of caption ``i`` of ``captions_en + captions_ko`` with empty / blank strings dropped (the order of
:meth:`WebtoonSample.captions`). The writer also stores that list in the sample's json as ``feature_captions``
and the language of each row as ``feature_languages`` (``"en"`` / ``"ko"``), so a reader never recomputes it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from src.data.caption_encoder import CaptionEncoder
from src.data.pipeline import expand_shards, read_captions
from src.data.schema import encode_npy
from src.data.shards import count_records, read_records, split_of, update_sizes

__all__ = [
    "FEATURES_KEY",
    "METADATA_FILE",
    "SAVED_ENCODER_DIR",
    "caption_rows",
    "load_text_encoder_from_features",
    "read_encoder_metadata",
    "precompute_text_features",
]

FEATURES_KEY = "txtfeat.npy"
METADATA_FILE = "text_features.json"
SAVED_ENCODER_DIR = "text_encoder"
# Captions are buffered across samples until this many batches are pending, so short shards and samples with
# few captions still fill the encoder's batches; sorting the buffer by length keeps padding small.
_BUFFER_BATCHES = 4

log = logging.getLogger(__name__)


def caption_rows(metadata: dict[str, Any], txt: str | None = None) -> tuple[list[str], list[str]]:
    """Captions of one sample in ``txtfeat.npy`` row order (English then Korean, blanks dropped) and their languages.

    Reads captions as ``src.data.pipeline.decode_record`` does, img2dataset's ``.txt`` / ``caption`` included.
    """
    english, korean = read_captions(metadata, txt)
    captions: list[str] = []
    languages: list[str] = []
    for lang, values in (("en", english), ("ko", korean)):
        if not isinstance(values, list):
            raise ValueError(f"captions_{lang} must be a list, got {type(values).__name__}")
        for caption in values:
            if isinstance(caption, str) and caption.strip():
                captions.append(caption)
                languages.append(lang)
    return captions, languages


def precompute_text_features(
    shards: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    encoder: CaptionEncoder,
    progress: bool = True,
) -> dict[str, Any]:
    """Write every input shard to ``out_dir/<same name>`` with a ``txtfeat.npy`` per sample; resumable, returns stats.

    A shard counts as done once its output exists, and its output is written only when the whole input was
    read: a shard that fails half way (damaged tar, interrupted run) is redone by the next call. Damaged
    shards are reported together in one error after the others are written.
    """
    paths = [Path(url) for url in expand_shards([str(s) for s in _as_list(shards)])]
    names = [p.name for p in paths]
    if len(set(names)) != len(names):
        raise ValueError(
            "Two input shards share a file name; outputs are named after inputs, so they would clash."
        )
    out_dir = Path(out_dir)
    if any(p.resolve().parent == out_dir.resolve() for p in paths):
        # Outputs keep the input names, so every shard would count as done and be skipped.
        raise ValueError(f"out_dir={out_dir} holds input shards; write the features to another directory.")
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata = _check_or_write_metadata(out_dir, encoder)

    stats: dict[str, Any] = {
        "shards_written": 0,
        "shards_skipped": 0,
        "shards_failed": [],
        "samples_written": 0,
        "samples_corrupt": 0,
        "samples_without_captions": 0,
        "captions_encoded": 0,
    }
    bar = tqdm(unit="sample", disable=not progress, desc="text features")
    try:
        for number, path in enumerate(paths, start=1):
            target = out_dir / path.name
            if target.exists():
                stats["shards_skipped"] += 1
                continue
            bar.set_description(f"text features {path.name} [{number}/{len(paths)}]")
            try:
                _encode_shard(path, target, encoder, stats, bar)
            except (tarfile.TarError, EOFError, OSError) as error:
                log.warning("%s could not be read to the end, not marked done: %s", path, error)
                stats["shards_failed"].append(f"{path} ({type(error).__name__}: {error})")
                continue
            stats["shards_written"] += 1
    finally:
        bar.close()

    # Recount every finished output shard of the touched splits, so sizes.json matches what is on disk even
    # after an interrupted run or when shards of one split were processed by several calls.
    counts: dict[str, int] = {}
    for split in sorted({split_of(p.name) for p in paths}):
        outputs = [p for p in out_dir.glob(f"{split}-*.tar") if split_of(p.name) == split]
        counts[split] = sum(count_records(p) for p in outputs)
    if stats["shards_failed"]:
        failed = "; ".join(stats["shards_failed"])
        raise RuntimeError(
            f"Text features: {len(stats['shards_failed'])} input shard(s) could not be read to the end and were "
            f"not written: {failed}. The other shards are done; rerun to retry, and rebuild or remove a "
            "damaged input shard."
        )
    update_sizes(out_dir, counts)
    stats["sizes"] = counts
    stats["metadata"] = metadata
    if stats["samples_corrupt"]:
        warnings.warn(
            f"Text features: skipped {stats['samples_corrupt']} unreadable samples (details in the log).",
            stacklevel=2,
        )
    return stats


def _as_list(value: Any) -> list:
    return [value] if isinstance(value, str | os.PathLike) else list(value)


def _check_or_write_metadata(out_dir: Path, encoder: CaptionEncoder) -> dict[str, Any]:
    """Write ``text_features.json`` (and the random encoder); refuse to mix features of two encoders in one dir."""
    metadata = encoder.metadata()
    if not encoder.pretrained:
        metadata["encoder"] = str((out_dir / SAVED_ENCODER_DIR).resolve())
        metadata["saved_encoder"] = SAVED_ENCODER_DIR
    elif os.path.exists(metadata["encoder"]):
        metadata["encoder"] = str(Path(metadata["encoder"]).resolve())
    metadata["dtype"] = "float16"
    metadata["rows"] = (
        "captions_en (+ img2dataset .txt) + captions_ko, blanks dropped; listed in json feature_captions"
    )

    path = out_dir / METADATA_FILE
    if path.exists():
        previous = json.loads(path.read_text())
        keys = ("fingerprint", "pooling", "dim", "max_length")
        if any(previous.get(k) != metadata[k] for k in keys):
            raise ValueError(
                f"{out_dir} already holds text features of another encoder "
                f"({ {k: previous.get(k) for k in keys} }); use a new out_dir or delete it."
            )
        return previous
    if not encoder.pretrained:
        encoder.save(out_dir / SAVED_ENCODER_DIR)
    path.write_text(json.dumps(metadata, indent=2, ensure_ascii=False) + "\n")
    return metadata


def _encode_shard(source: Path, target: Path, encoder: CaptionEncoder, stats: dict, bar: tqdm) -> None:
    """Copy ``source`` to ``target`` with features added; the temp file is renamed only once complete."""
    import webdataset as wds

    partial = target.with_name(target.name + ".tmp")
    partial.unlink(missing_ok=True)
    pending: list[tuple[dict[str, Any], list[str]]] = []
    pending_captions = 0

    # mtime=0 like write_shards: the same input and encoder give byte-identical output shards.
    with _removed_on_error(partial), wds.TarWriter(str(partial), encoder=False, mtime=0) as sink:

        def flush() -> None:
            nonlocal pending, pending_captions
            texts = [caption for _, captions in pending for caption in captions]
            vectors = encoder.encode(texts).to(torch.float16).numpy() if texts else None
            start = 0
            for record, captions in pending:
                rows = vectors[start : start + len(captions)] if vectors is not None else None
                if rows is None:
                    rows = np.zeros((0, encoder.dim), dtype=np.float16)
                record[FEATURES_KEY] = encode_npy(rows)
                record.pop("__url__", None)
                start += len(captions)
                sink.write(record)
            stats["samples_written"] += len(pending)
            stats["captions_encoded"] += len(texts)
            bar.update(len(pending))
            pending, pending_captions = [], 0

        for record in read_records(source):
            try:
                record = _with_caption_order(record)
            except (ValueError, UnicodeDecodeError) as error:
                stats["samples_corrupt"] += 1
                log.warning("%s: skipping sample %r: %s", source.name, record["__key__"], error)
                continue
            captions = json.loads(record["json"])["feature_captions"]
            stats["samples_without_captions"] += not captions
            pending.append((record, captions))
            pending_captions += len(captions)
            if pending_captions >= _BUFFER_BATCHES * encoder.batch_size:
                flush()
        flush()
    os.replace(partial, target)


@contextlib.contextmanager
def _removed_on_error(path: Path) -> Iterator[None]:
    try:
        yield
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _with_caption_order(record: dict[str, Any]) -> dict[str, Any]:
    """The record with ``feature_captions`` / ``feature_languages`` added to its json; raises on a bad sample."""
    # Like the training reader, a record without json is valid (img2dataset's .txt carries the caption).
    metadata = json.loads(record["json"].decode("utf-8")) if "json" in record else {}
    if not isinstance(metadata, dict):
        raise ValueError("json is not an object")
    txt = record["txt"].decode("utf-8") if "txt" in record else None
    captions, languages = caption_rows(metadata, txt)
    metadata["feature_captions"] = captions
    metadata["feature_languages"] = languages
    out = dict(record)
    out["json"] = json.dumps(metadata, ensure_ascii=False).encode("utf-8")
    out.pop(FEATURES_KEY, None)
    return out


def read_encoder_metadata(features_dir: str | os.PathLike) -> dict[str, Any]:
    """The encoder record of ``features_dir/text_features.json``, its saved random encoder resolved to a path.

    Models keep this record in their checkpoints, so inference encodes new captions with the same encoder.
    """
    features_dir = Path(features_dir)
    path = features_dir / METADATA_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: is {features_dir} an output of precompute_text_features.py?"
        )
    metadata = json.loads(path.read_text())
    if metadata.get("saved_encoder"):
        # Relative to the features dir, so the directory can be moved or copied to another machine.
        metadata["encoder"] = str((features_dir / metadata["saved_encoder"]).resolve())
    return metadata


def load_text_encoder_from_features(
    features_dir: str | os.PathLike, device: str | torch.device = "cpu", batch_size: int = 64
) -> CaptionEncoder:
    """The encoder that wrote ``features_dir`` (from its ``text_features.json``), to encode new captions alike."""
    return CaptionEncoder.from_metadata(read_encoder_metadata(features_dir), device, batch_size)
