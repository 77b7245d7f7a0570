"""CLIP tokenizers for models trained here from scratch: byte-level BPE whose merges spell whole words.

A ``CLIPTokenizer`` needs ``vocab.json`` and ``merges.txt``. Training BPE is unnecessary when the vocabulary is
known: every byte symbol (alone and as a word end) keeps any text encodable, and left-to-right merges of each
listed word make it one token. Words not listed (a placeholder like ``*`` or ``sks``) fall back to bytes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["byte_symbols", "caption_clip_tokenizer", "write_clip_tokenizer"]


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE (GPT-2's table): printable Latin-1 bytes stand for
    themselves, the others are shifted past 255."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def write_clip_tokenizer(out_dir: str | os.PathLike, words: Iterable[str], model_max_length: int) -> Path:
    """A ``CLIPTokenizer`` directory in which each of ``words`` (lower-case ASCII) is a single token."""
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    symbols = byte_symbols()
    vocab: dict[str, int] = {}
    for token in [*symbols, *(s + "</w>" for s in symbols)]:
        vocab.setdefault(token, len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        # What the merges so far make of the word, then merges of those pieces left to right. Appended merges
        # rank last, so they never fire inside earlier words (already single tokens) and the existing ones
        # still split this word as computed.
        pieces = _apply_merges([*word[:-1], word[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            ranks.setdefault((pieces[0], pieces[1]), len(ranks))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
    merges = [f"{left} {right}" for left, right in ranks]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (out_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": model_max_length}))
    CLIPTokenizer.from_pretrained(out_dir).save_pretrained(out_dir)
    return out_dir


def _apply_merges(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: repeatedly merge the adjacent pair of lowest rank."""
    while len(pieces) > 1:
        pairs = [
            (ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(pieces, pieces[1:], strict=False))
        ]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces = [*pieces[:i], pieces[i] + pieces[i + 1], *pieces[i + 2 :]]
    return pieces


def caption_clip_tokenizer(
    out_dir: str | os.PathLike, kinds: Sequence[str] | None = None, model_max_length: int = 40
):
    """The ``CLIPTokenizer`` of the shapes dataset's English captions (written to ``out_dir`` when missing)."""
    from transformers import CLIPTokenizer

    from src.demo.synthetic import KINDS, caption_vocabulary

    out_dir = Path(out_dir)
    if not (out_dir / "vocab.json").is_file():
        words = [w.lower() for w in caption_vocabulary(kinds or KINDS) if w.isascii() and w.isalpha()]
        write_clip_tokenizer(out_dir, sorted(set(words)), model_max_length)
    return CLIPTokenizer.from_pretrained(out_dir)
