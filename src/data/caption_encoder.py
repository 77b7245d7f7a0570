"""Captions -> sentence vectors with a Hugging Face text encoder, as the thesis feeds its GAN (chapter III).

The thesis takes the last hidden state at [CLS] of pretrained multilingual BERT; mean pooling is the other
choice. An encoder is named by a hub id or local path, or initialised at random from a config (the offline
demos), and it has a fingerprint so that whoever encodes new captions later can check they use the same one.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from src.utils.config import plain
from src.utils.device import resolve_device
from src.utils.hub import from_pretrained, load_or_init_model
from src.utils.pooling import masked_mean

__all__ = ["DEFAULT_ENCODER", "CaptionEncoder"]

DEFAULT_ENCODER = "bert-base-multilingual-cased"


class CaptionEncoder:
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
        from transformers import AutoTokenizer

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
        # A random encoder's vocabulary is its tokenizer's.
        overrides = {} if self.pretrained else {"vocab_size": len(self.tokenizer)}
        if not self.pretrained and self.tokenizer.pad_token_id is not None:
            overrides["pad_token_id"] = self.tokenizer.pad_token_id
        self.model = load_or_init_model(
            self.name_or_path, plain(config), "encoder.name_or_path", seed=seed, **overrides
        )
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if positions is not None and self.max_length > positions:
            raise ValueError(
                f"encoder.max_length={self.max_length} exceeds the model's {positions} positions."
            )
        self.model.eval().requires_grad_(False)
        self.device = torch.device("cpu")
        self.to(device)
        self._fingerprint: str | None = None

    @classmethod
    def from_metadata(
        cls, metadata: dict[str, Any], device: str | torch.device = "cpu", batch_size: int = 64
    ) -> CaptionEncoder:
        """The encoder a ``text_features.json`` record (or a checkpoint's copy of it) describes.

        Warns when the loaded weights differ from the recorded fingerprint: new captions would then not match
        the vectors the model was trained on.
        """
        encoder = cls(
            name_or_path=metadata["encoder"],
            pooling=metadata["pooling"],
            max_length=metadata["max_length"],
            batch_size=batch_size,
            device=device,
        )
        if metadata.get("fingerprint") and encoder.fingerprint() != metadata["fingerprint"]:
            warnings.warn(
                f"The caption encoder loaded from '{metadata['encoder']}' differs from the one that encoded the "
                "training captions (weights or vocabulary changed); new captions will not match them.",
                stacklevel=2,
            )
        return encoder

    @property
    def dim(self) -> int:
        """Size of one sentence vector."""
        return int(self.model.config.hidden_size)

    def to(self, device: str | torch.device) -> CaptionEncoder:
        """Move the model to ``device`` (``"auto"`` = CUDA when available)."""
        self.device = resolve_device(device)
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
            # "cls": the last hidden state at [CLS], the thesis' sentence vector.
            vectors = hidden[:, 0] if self.pooling == "cls" else masked_mean(hidden, inputs["attention_mask"])
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
