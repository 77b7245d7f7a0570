"""The project's bilingual CLIP as the encoder of queries and indexed images (thesis chapter V).

It loads from what training leaves: a checkpoint of ``train.py`` (a
:class:`~src.modules.clip_module.WebtoonCLIP`) or its transformers export (``evaluate.py export_dir=...``).
A checkpoint rebuilds its towers as training built them (towers named by hub id need the hub or its cache
before the checkpoint's weights replace theirs); an export needs nothing else. Each kind encodes with its
owner's code (the module's dual encoder, transformers' ``get_*_features``); both read images with the
preprocessing the model was trained with (:class:`~src.data.preprocess.Preprocess`: shorter side resized,
centre crop, the model's mean and std), not the export's ``ViTImageProcessor``, which stretches non-square
images. The fingerprint hashes what decides the embeddings (weights, pooling, vocabulary, image
preprocessing), so a checkpoint and its export share it, and an index can tell whether a query encoder is the
one that built it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from src.data.preprocess import Preprocess
from src.utils.device import resolve_device
from src.utils.hub import from_pretrained

__all__ = ["CLIPEncoder"]

# Parts of the model that do not change an embedding: the temperature (the export clamps it) ...
_NOT_EMBEDDING_WEIGHTS = ("logit_scale",)
# ... and the bookkeeping that a transformers config gains on the way to disk and back.
_CONFIG_BOOKKEEPING = {"_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype"}


class CLIPEncoder:
    """The project's bilingual CLIP as a query and image encoder, from a train.py checkpoint or its export."""

    def __init__(
        self,
        towers: nn.Module,
        tokenizer: Any,
        max_length: int,
        image_preprocess: Preprocess,
        path: str,
        kind: str,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
    ) -> None:
        """``towers``: anything with the dual encoder's ``model``, ``text_pooling``, ``image_pooling``,
        ``encode_text(input_ids, attention_mask)`` and ``encode_image(pixel_values)`` (normalised outputs)."""
        self.device = resolve_device(device)
        self.towers = towers.to(self.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.image_preprocess = image_preprocess
        self.image_transform = image_preprocess.image_transform()
        self.batch_size = int(batch_size)
        self._path, self._kind = path, kind
        self._fingerprint: str | None = None

    @classmethod
    def load(cls, name_or_path: str | os.PathLike, device: str = "cpu", setting: str = "clip") -> CLIPEncoder:
        """A checkpoint written by ``train.py`` (a file) or a directory that ``VisionTextDualEncoderModel``
        and ``AutoProcessor`` load; anything else fails with one message naming ``setting``."""
        path = Path(name_or_path).expanduser()
        if path.is_file():
            return cls._from_checkpoint(path, device, setting)
        if path.is_dir():
            return cls._from_export(path, device, setting)
        raise FileNotFoundError(
            f"Cannot load the CLIP for `{setting}`: {name_or_path} does not exist. Set `{setting}` to a "
            "checkpoint of train.py (experiment=clip_*, e.g. RUN/checkpoints/last.ckpt) or to its export "
            "directory (evaluate.py ... export_dir=DIR)."
        )

    @classmethod
    def _from_checkpoint(cls, path: Path, device: str, setting: str) -> CLIPEncoder:
        from src.modules.clip_module import WebtoonCLIP

        try:
            # mmap: only the hyper-parameters are looked at here
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:  # torch raises several types for files that are not checkpoints
            raise ValueError(
                f"Cannot load the CLIP for `{setting}`: {path} is not a readable checkpoint ({error})."
            ) from error
        hparams = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
        if not {"text_encoder", "image_encoder", "preprocess"} <= set(hparams):
            raise ValueError(
                f"Cannot load the CLIP for `{setting}`: {path} is not a checkpoint of the CLIP "
                "(train.py experiment=clip_*); set it to one, or to a CLIP export directory."
            )
        del checkpoint
        module = WebtoonCLIP.load_from_checkpoint(path, map_location="cpu", weights_only=True)
        preprocess = module.preprocess
        if preprocess.loaded_tokenizer is None:
            raise ValueError(
                f"The CLIP at `{setting}`={path} names no tokenizer (model.preprocess.tokenizer)."
            )
        return cls(
            module.encoder,
            preprocess.loaded_tokenizer,
            preprocess.max_length,
            Preprocess(
                image_size=preprocess.image_size,
                image_mean=preprocess.image_mean,
                image_std=preprocess.image_std,
            ),
            str(path.resolve()),
            "checkpoint",
            device,
        )

    @classmethod
    def _from_export(cls, path: Path, device: str, setting: str) -> CLIPEncoder:
        from transformers import AutoProcessor, VisionTextDualEncoderModel

        model = from_pretrained(VisionTextDualEncoderModel.from_pretrained, str(path), setting)
        processor = from_pretrained(AutoProcessor.from_pretrained, str(path), setting)
        size = processor.image_processor.size
        if size.get("height") != size.get("width"):
            raise ValueError(
                f"The CLIP export at `{setting}`={path} resizes images to {size}; the project's exports are "
                "square (height = width)."
            )
        image_preprocess = Preprocess(
            image_size=int(size["height"]),
            image_mean=tuple(processor.image_processor.image_mean),
            image_std=tuple(processor.image_processor.image_std),
        )
        # The export does not record the checkpoint's max_length: texts are cut where the text tower must cut.
        positions = model.config.text_config.max_position_embeddings
        max_length = min(processor.tokenizer.model_max_length, positions)
        return cls(
            _ExportedTowers(model),
            processor.tokenizer,
            max_length,
            image_preprocess,
            str(path.resolve()),
            "export",
            device,
        )

    # ---- encoding ------------------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Size of one embedding."""
        return int(self.towers.model.config.projection_dim)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """[n, D] float32 on the CPU, L2-normalised."""
        texts = list(texts)
        if not all(isinstance(text, str) for text in texts):
            raise TypeError("encode_texts takes a list of strings.")
        out = [torch.empty(0, self.dim)]
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            embeds = self.towers.encode_text(
                tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
            )
            out.append(embeds.float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """[n, D] float32 on the CPU, L2-normalised."""
        images = list(images)
        out = [torch.empty(0, self.dim)]
        for start in range(0, len(images), self.batch_size):
            pixels = torch.stack(
                [self.image_transform(image) for image in images[start : start + self.batch_size]]
            )
            pixel_values = self.image_preprocess.normalize(pixels).to(self.device)
            out.append(self.towers.encode_image(pixel_values).float().cpu())
        return torch.cat(out)

    # ---- what it is ----------------------------------------------------------------------------------------

    @property
    def record(self) -> dict[str, str]:
        """``path``, ``kind`` (checkpoint | export), ``config_hash`` (the architecture), ``fingerprint``."""
        return {
            "path": self._path,
            "kind": self._kind,
            "config_hash": self.config_hash(),
            "fingerprint": self.fingerprint(),
        }

    def config_hash(self) -> str:
        """SHA-256 of the dual encoder's transformers config, without what saving and loading add to it."""
        config = _without_bookkeeping(self.towers.model.config.to_dict())
        return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()

    def fingerprint(self) -> str:
        """SHA-256 of the weights, pooling, tokenizer vocabulary and image preprocessing: two encoders with
        the same fingerprint give the same embeddings (a checkpoint and its export do)."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for name, tensor in sorted(self.towers.model.state_dict().items()):
                if name in _NOT_EMBEDDING_WEIGHTS:
                    continue
                digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                digest.update(
                    tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                )
            described = {
                "pooling": [self.towers.text_pooling, self.towers.image_pooling],
                "vocabulary": sorted(self.tokenizer.get_vocab().items()),
                "image_size": self.image_preprocess.image_size,
                "image_mean": [float(v) for v in self.image_preprocess.image_mean],
                "image_std": [float(v) for v in self.image_preprocess.image_std],
            }
            digest.update(json.dumps(described, ensure_ascii=False, sort_keys=True).encode())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint


class _ExportedTowers(nn.Module):
    """A transformers ``VisionTextDualEncoderModel`` behind the dual encoder's encoding methods."""

    text_pooling = image_pooling = "cls"  # transformers pools at [CLS] (the export refuses anything else)

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        features = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(features.pooler_output, dim=-1)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)


def _without_bookkeeping(config: Any) -> Any:
    if isinstance(config, dict):
        return {k: _without_bookkeeping(v) for k, v in config.items() if k not in _CONFIG_BOOKKEEPING}
    return config
