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

import hashlib
import json
import logging
import os
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from src.data import pipeline
from src.data.pipeline import read_captions
from src.data.schema import encode_npy
from src.data.shards import update_sizes
from src.utils.hub import from_pretrained

__all__ = [
    "FEATURES_KEY",
    "METADATA_FILE",
    "SAVED_ENCODER_DIR",
    "TextFeatureEncoder",
    "expand_shards",
    "caption_rows",
    "load_text_encoder_from_features",
    "precompute_text_features",
]

FEATURES_KEY = "txtfeat.npy"
METADATA_FILE = "text_features.json"
SAVED_ENCODER_DIR = "text_encoder"
DEFAULT_ENCODER = "bert-base-multilingual-cased"
# Captions are buffered across samples until this many batches are pending, so short shards and samples with
# few captions still fill the encoder's batches; sorting the buffer by length keeps padding small.
_BUFFER_BATCHES = 4

log = logging.getLogger(__name__)


class TextFeatureEncoder:
    """A Hugging Face text encoder (hub name, local path, or random init from a config) giving one vector per text."""

    def __init__(
        self,
        name_or_path: str | None = DEFAULT_ENCODER,
        config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        pooling: Literal["cls", "mean"] = "cls",
        max_length: int = 64,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ) -> None:
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        if name_or_path is None and not config:
            raise ValueError(
                "Give encoder.name_or_path (hub name or local path) or encoder.config (random init)."
            )
        self.pooling = pooling
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.pretrained = name_or_path is not None
        self.name_or_path = str(name_or_path) if name_or_path is not None else None

        tokenizer_source = tokenizer or self.name_or_path or DEFAULT_ENCODER
        tokenizer_setting = "encoder.tokenizer" if tokenizer else "encoder.name_or_path"
        self.tokenizer = from_pretrained(AutoTokenizer.from_pretrained, tokenizer_source, tokenizer_setting)
        if self.name_or_path is not None:
            self.model = from_pretrained(AutoModel.from_pretrained, self.name_or_path, "encoder.name_or_path")
        else:
            options = (
                OmegaConf.to_container(config, resolve=True) if OmegaConf.is_config(config) else dict(config)
            )
            model_type = options.pop("model_type", None)
            if model_type is None:
                raise ValueError("encoder.config needs a `model_type` (e.g. bert) to build a random encoder.")
            options["vocab_size"] = len(self.tokenizer)
            if self.tokenizer.pad_token_id is not None:
                options.setdefault("pad_token_id", self.tokenizer.pad_token_id)
            model_config = AutoConfig.for_model(model_type, **options)
            # A private RNG stream: the same seed gives the same weights whatever ran before.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.model = AutoModel.from_config(model_config)
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if positions is not None and self.max_length > positions:
            raise ValueError(
                f"encoder.max_length={self.max_length} exceeds the model's {positions} positions."
            )
        self.model.eval().requires_grad_(False)
        self.device = torch.device("cpu")
        self.to(device)
        self._fingerprint: str | None = None

    @property
    def dim(self) -> int:
        """Size of one sentence vector."""
        return int(self.model.config.hidden_size)

    def to(self, device: str | torch.device) -> TextFeatureEncoder:
        """Move the model to ``device`` (``"auto"`` = CUDA when available)."""
        if str(device) == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Sentence vectors [len(texts), dim] float32 on CPU, computed ``batch_size`` texts per forward pass."""
        texts = list(texts)
        out = torch.empty(len(texts), self.dim, dtype=torch.float32)
        # Length-sorted batches pad less; results are scattered back to the input order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            inputs = self.tokenizer(
                [texts[i] for i in index],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**inputs).last_hidden_state.float()
            if self.pooling == "cls":
                vectors = hidden[:, 0]
            else:
                mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                vectors = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            out[torch.tensor(index)] = vectors.cpu()
        return out

    def save(self, directory: str | os.PathLike) -> Path:
        """Save model and tokenizer with ``save_pretrained`` so the encoder reloads by path."""
        directory = Path(directory)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        return directory

    def fingerprint(self) -> str:
        """SHA-256 of the weights and vocabulary: two encoders with the same fingerprint give the same vectors."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for name, tensor in sorted(self.model.state_dict().items()):
                digest.update(name.encode())
                digest.update(
                    tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                )
            vocab = sorted(self.tokenizer.get_vocab().items())
            digest.update(json.dumps(vocab, ensure_ascii=False).encode())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def metadata(self) -> dict[str, Any]:
        """What ``text_features.json`` records about this encoder."""
        return {
            "encoder": self.name_or_path,
            "pretrained": self.pretrained,
            "pooling": self.pooling,
            "dim": self.dim,
            "max_length": self.max_length,
            "fingerprint": self.fingerprint(),
        }


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


def expand_shards(shards: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Shard paths from brace patterns or globs, refusing two inputs with one file name (outputs reuse names)."""
    paths = [
        Path(url)
        for url in pipeline.expand_shards(
            [str(s) for s in ([shards] if isinstance(shards, str | os.PathLike) else shards)]
        )
    ]
    names = [p.name for p in paths]
    if len(set(names)) != len(names):
        raise ValueError(
            "Two input shards share a file name; outputs are named after inputs, so they would clash."
        )
    return paths


def _split_of(shard_name: str) -> str:
    """``train-000003.tar`` -> ``train``: the sizes.json key written by :func:`write_shards`."""
    stem = shard_name.split(".", 1)[0]
    return stem.rsplit("-", 1)[0] if "-" in stem else stem


def _base_plus_ext(name: str) -> tuple[str, str]:
    # The webdataset convention: the key is everything up to the first dot of the file name.
    directory, _, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{directory}/{key}" if directory else key), ext


def _iter_records(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a tar shard in order, as ``{"__key__", ext: bytes, ...}``, without decoding anything."""
    record: dict[str, Any] | None = None
    with tarfile.open(path, mode="r|*") as stream:
        for member in stream:
            if not member.isreg():
                continue
            key, ext = _base_plus_ext(member.name)
            if record is not None and key != record["__key__"]:
                yield record
                record = None
            if record is None:
                record = {"__key__": key}
            record[ext] = stream.extractfile(member).read()
    if record is not None:
        yield record


def _count_records(path: Path) -> int:
    with tarfile.open(path, mode="r|*") as stream:
        return len({_base_plus_ext(m.name)[0] for m in stream if m.isreg()})


def precompute_text_features(
    shards: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    encoder: TextFeatureEncoder,
    progress: bool = True,
) -> dict[str, Any]:
    """Write every input shard to ``out_dir/<same name>`` with a ``txtfeat.npy`` per sample; resumable, returns stats."""
    paths = expand_shards(shards)
    out_dir = Path(out_dir)
    if any(p.resolve().parent == out_dir.resolve() for p in paths):
        # Outputs keep the input names, so every shard would count as done and be skipped.
        raise ValueError(f"out_dir={out_dir} holds input shards; write the features to another directory.")
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata = _check_or_write_metadata(out_dir, encoder)

    stats: dict[str, Any] = {
        "shards_written": 0,
        "shards_skipped": 0,
        "samples_written": 0,
        "samples_corrupt": 0,
        "shards_truncated": 0,
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
            _encode_shard(path, target, encoder, stats, bar)
            stats["shards_written"] += 1
    finally:
        bar.close()

    # Recount every finished output shard of the touched splits, so sizes.json matches what is on disk even
    # after an interrupted run or when shards of one split were processed by several calls.
    counts: dict[str, int] = {}
    for split in sorted({_split_of(p.name) for p in paths}):
        outputs = [p for p in out_dir.glob(f"{split}-*.tar") if _split_of(p.name) == split]
        counts[split] = sum(_count_records(p) for p in outputs)
    update_sizes(out_dir, counts)
    stats["sizes"] = counts
    stats["metadata"] = metadata
    if stats["samples_corrupt"] or stats["shards_truncated"]:
        warnings.warn(
            f"Text features: skipped {stats['samples_corrupt']} unreadable samples and cut "
            f"{stats['shards_truncated']} damaged shards short (details in the log).",
            stacklevel=2,
        )
    return stats


def _check_or_write_metadata(out_dir: Path, encoder: TextFeatureEncoder) -> dict[str, Any]:
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


def _encode_shard(source: Path, target: Path, encoder: TextFeatureEncoder, stats: dict, bar: tqdm) -> None:
    """Copy ``source`` to ``target`` with features added; the temp file is renamed only once complete."""
    import webdataset as wds

    partial = target.with_name(target.name + ".tmp")
    pending: list[tuple[dict[str, Any], list[str]]] = []
    pending_captions = 0

    # mtime=0 like write_shards: the same input and encoder give byte-identical output shards.
    with wds.TarWriter(str(partial), encoder=False, mtime=0) as sink:

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
                start += len(captions)
                sink.write(record)
            stats["samples_written"] += len(pending)
            stats["captions_encoded"] += len(texts)
            bar.update(len(pending))
            pending, pending_captions = [], 0

        records = _iter_records(source)
        while True:
            try:
                record = next(records)
            except StopIteration:
                break
            except (tarfile.TarError, EOFError) as error:
                # A truncated shard keeps what was readable: re-running cannot recover the rest either.
                stats["shards_truncated"] += 1
                log.warning(
                    "%s is truncated or damaged; kept the samples before the damage: %s", source.name, error
                )
                break
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


def load_text_encoder_from_features(
    features_dir: str | os.PathLike, device: str | torch.device = "cpu", batch_size: int = 64
) -> TextFeatureEncoder:
    """The encoder that wrote ``features_dir`` (from its ``text_features.json``), to encode new captions alike."""
    features_dir = Path(features_dir)
    path = features_dir / METADATA_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: is {features_dir} an output of precompute_text_features.py?"
        )
    metadata = json.loads(path.read_text())
    source = metadata["encoder"]
    if metadata.get("saved_encoder"):
        # Relative to the features dir, so the directory can be moved or copied to another machine.
        source = str(features_dir / metadata["saved_encoder"])
    encoder = TextFeatureEncoder(
        name_or_path=source,
        pooling=metadata["pooling"],
        max_length=metadata["max_length"],
        batch_size=batch_size,
        device=device,
    )
    if metadata.get("fingerprint") and encoder.fingerprint() != metadata["fingerprint"]:
        warnings.warn(
            f"The encoder loaded from '{source}' differs from the one that wrote {features_dir} "
            "(weights or vocabulary changed); new captions will not match the precomputed features.",
            stacklevel=2,
        )
    return encoder
