"""Captions -> webtoon images with a trained text-to-webtoon GAN (thesis chapter III).

The one generation path of the DCGAN: ``generate.py``, the sample-grid callback and the demo's colour check all
call it, and a service will too. It encodes captions with the encoder recorded in the checkpoint (the one that
computed the training features), rounded through float16 like the stored features, and draws every caption
with the same seeded noise, so that column ``j`` of a result differs between captions only by the caption.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from src.data.text_features import TextFeatureEncoder
    from src.modules.dcgan_module import TextToWebtoonGAN


class TextToWebtoonGANPipeline:
    """``pipeline(captions, num_images_per_caption, seed)`` -> images [n, k, 3, H, W] in [0, 1]."""

    def __init__(self, gan: TextToWebtoonGAN, caption_encoder: TextFeatureEncoder) -> None:
        self.gan = gan
        self.caption_encoder = caption_encoder

    @classmethod
    def for_module(cls, gan: TextToWebtoonGAN) -> TextToWebtoonGANPipeline:
        """The pipeline of a (training) module, with the caption encoder its checkpoint records."""
        from src.data.text_features import TextFeatureEncoder

        record = gan.hparams.get("caption_encoder")
        if not record:
            raise ValueError(
                "This GAN does not record its caption encoder: set model.text_features_dir to the precomputed "
                "features it trains on (their text_features.json names the encoder)."
            )
        return cls(gan, TextFeatureEncoder.from_metadata(record, device=gan.device))

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str = "cpu") -> TextToWebtoonGANPipeline:
        """Everything from one checkpoint written by ``train.py`` (loaded with ``weights_only=True``)."""
        from src.modules.dcgan_module import TextToWebtoonGAN

        gan = TextToWebtoonGAN.load_from_checkpoint(path, map_location=device, weights_only=True)
        return cls.for_module(gan.eval())

    @property
    def device(self) -> torch.device:
        return self.gan.device

    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        """Sentence vectors [n, D] as the GAN saw them in training (stored as float16)."""
        self.caption_encoder.to(self.device)
        return self.caption_encoder.encode(list(captions)).to(torch.float16).float()

    @torch.no_grad()
    def __call__(
        self,
        captions: Sequence[str] | None = None,
        num_images_per_caption: int = 1,
        seed: int = 0,
        text_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Images for ``captions`` (or already encoded ``text_features``), the same noise for every caption."""
        if text_features is None:
            if not captions:
                raise ValueError("Give at least one caption.")
            text_features = self.encode(captions)
        count, per_caption = len(text_features), num_images_per_caption
        noise = torch.randn(per_caption, self.gan.noise_dim, generator=torch.Generator().manual_seed(seed))
        features = text_features.to(self.device).repeat_interleave(per_caption, dim=0)
        images = self.gan.generate(features, noise.repeat(count, 1).to(self.device))
        return ((images.float().cpu() + 1) / 2).clamp(0, 1).view(count, per_caption, *images.shape[1:])
