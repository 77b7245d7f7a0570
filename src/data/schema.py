"""One sample schema for every module: an image with English and Korean captions.

On disk a sample is a webdataset record: ``<key>.jpg`` (or ``.png``) holds the image bytes and
``<key>.json`` the metadata below. Precomputed text features, when present, live in
``<key>.txtfeat.npy`` with one row per caption, in the order the json's ``feature_captions`` lists.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
LANGUAGES = ("en", "ko")
SPLITS = ("train", "val", "test")


@dataclass
class WebtoonSample:
    """An image with its bilingual captions, as every module of the framework sees it."""

    key: str
    image: Image.Image
    captions_en: list[str] = field(default_factory=list)
    captions_ko: list[str] = field(default_factory=list)
    style: str = "photo"
    image_id: str | int | None = None
    text_features: np.ndarray | None = None  # one row per caption of ``feature_captions``
    feature_captions: list[str] | None = None  # caption order of the text_features rows

    def captions(self, languages: tuple[str, ...] | list[str] = LANGUAGES) -> list[str]:
        """Captions in the asked languages, English first, empty strings dropped."""
        out: list[str] = []
        for lang in languages:
            out += [c for c in getattr(self, f"captions_{lang}") if c and c.strip()]
        return out

    def metadata(self) -> dict:
        return {
            "captions_en": list(self.captions_en),
            "captions_ko": list(self.captions_ko),
            "style": self.style,
            "image_id": self.image_id,
        } | ({"feature_captions": list(self.feature_captions)} if self.feature_captions is not None else {})

    def to_record(self, image_format: str = "jpg", quality: int = 95) -> dict:
        """The webdataset record (``{"__key__", "jpg"|"png", "json"[, "txtfeat.npy"]}``) of this sample."""
        buffer = io.BytesIO()
        if image_format == "png":
            self.image.save(buffer, format="PNG")
        else:
            self.image.convert("RGB").save(buffer, format="JPEG", quality=quality)
        record = {
            "__key__": self.key,
            image_format: buffer.getvalue(),
            "json": json.dumps(self.metadata(), ensure_ascii=False).encode("utf-8"),
        }
        if self.text_features is not None:
            record["txtfeat.npy"] = encode_npy(self.text_features)
        return record


def encode_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)
