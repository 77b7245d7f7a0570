"""What a model expects of its inputs, owned by the model and followed by the data pipeline.

As open_clip's ``create_model_and_transforms`` hands the transforms out of the model factory, each model here
carries a :class:`Preprocess` in its hyper-parameters (``model.preprocess``); the data configs read it
(``data.preprocess: ${model.preprocess}``), and export, analyses and inference take it from the checkpoint,
with no DataModule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any


@dataclass(frozen=True)
class Preprocess:
    """Image geometry and normalisation, and the tokenizer (hub name or local path; None = no text tokens)."""

    image_size: int = 224
    image_mean: Sequence[float] = field(default=(0.5, 0.5, 0.5))
    image_std: Sequence[float] = field(default=(0.5, 0.5, 0.5))
    tokenizer: str | None = None
    max_length: int = 64

    @classmethod
    def of(cls, spec: Preprocess | dict[str, Any] | None) -> Preprocess:
        """A Preprocess from itself, a plain dict (configs, checkpoints) or None (the defaults)."""
        if isinstance(spec, Preprocess):
            return spec
        spec = dict(spec or {})
        for key in ("image_mean", "image_std"):
            if key in spec:
                spec[key] = tuple(float(v) for v in spec[key])
        return cls(**spec)

    def to_dict(self) -> dict[str, Any]:
        """Plain containers only, so checkpoints that hold it load with ``weights_only=True``."""
        out = asdict(self)
        out["image_mean"], out["image_std"] = list(self.image_mean), list(self.image_std)
        return out

    def image_transform(self):
        """PIL image -> uint8 tensor [3, S, S]: shorter side resized to S, centre crop. Per sample, so it stays
        cheap (torchvision's v2 pipeline costs ~0.5 ms per image in dispatch alone); :meth:`normalize` then
        works on whole batches."""
        return _ResizeCrop(self.image_size)

    def normalize(self, images, out=None):
        """uint8 images [..., 3, H, W] -> float, scaled to [0, 1] and normalised with the mean and std.

        One pass, ``images * 1 / (255 std) - mean / std``, written into ``out`` (a float32 tensor of the same shape)
        when given: a loader worker passes a buffer in shared memory, so the batch is written once, where the
        training process reads it."""
        import torch

        std = torch.tensor(self.image_std, device=images.device).view(-1, 1, 1)
        mean = torch.tensor(self.image_mean, device=images.device).view(-1, 1, 1)
        return torch.mul(images, 1 / (255 * std), out=out).sub_(mean / std)

    def denormalize(self, images):
        """Normalised tensors [B, 3, H, W] back to [0, 1]."""
        import torch

        mean = torch.tensor(self.image_mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.image_std, device=images.device).view(1, -1, 1, 1)
        return (images * std + mean).clamp(0, 1)

    @cached_property
    def loaded_tokenizer(self):
        """The tokenizer, loaded once (None when this model takes no text tokens)."""
        if not self.tokenizer:
            return None
        from transformers import AutoTokenizer

        from src.utils.hub import from_pretrained

        return from_pretrained(
            AutoTokenizer.from_pretrained, str(self.tokenizer), "model.preprocess.tokenizer"
        )

    def tokenize(self, captions: list[str]) -> dict:
        """``input_ids`` and ``attention_mask`` [B, L] of ``captions``, padded to the longest, cut at max_length."""
        tokens = self.loaded_tokenizer(
            captions, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


class _ResizeCrop:
    """Shorter side to ``size`` (antialiased bicubic), then a centre crop; images already ``size``×``size`` pass as
    they are. The resize runs on the uint8 tensor: torch's vectorised kernel takes about half of PIL's time."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image):
        import numpy as np
        import torch
        from torchvision.transforms.v2 import functional as F

        pixels = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)
        if image.size == (self.size, self.size):
            return pixels
        resized = F.resize(pixels, self.size, interpolation=F.InterpolationMode.BICUBIC, antialias=True)
        return F.center_crop(resized, [self.size, self.size]).contiguous()
