"""Captions -> webtoon images with a trained text-to-webtoon GAN (thesis chapter III).

Captions are encoded with the encoder recorded in the GAN (the one that computed its training features), rounded
through float16 as the stored features were, and every caption is drawn with the same seeded noise vectors, so
that column ``j`` of a result differs between captions only by the caption.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from src.data.caption_encoder import CaptionEncoder
from src.pipelines.text_to_image import StepCallback

if TYPE_CHECKING:
    from src.modules.dcgan_module import TextToWebtoonGAN

__all__ = ["GANTextToImage"]


class GANTextToImage:
    """``text_to_image(captions, num_images_per_prompt, seed)`` -> images [n, k, 3, H, W] in [0, 1]."""

    def __init__(
        self, gan: TextToWebtoonGAN, caption_encoder: CaptionEncoder, source: Mapping[str, Any] | None = None
    ) -> None:
        """``source``: where the GAN came from (e.g. its checkpoint), for manifests."""
        self.gan = gan
        self.caption_encoder = caption_encoder
        self.source = dict(source or {})

    @classmethod
    def for_module(cls, gan: TextToWebtoonGAN, source: Mapping[str, Any] | None = None) -> GANTextToImage:
        """The GAN with the caption encoder its hyper-parameters record."""
        record = gan.hparams.get("caption_encoder")
        if not record:
            raise ValueError(
                "This GAN does not record its caption encoder: set model.text_features_dir to the precomputed "
                "features it trains on (their text_features.json names the encoder)."
            )
        return cls(gan, CaptionEncoder.from_metadata(record, device=gan.device), source)

    @property
    def device(self) -> torch.device:
        return self.gan.device

    @property
    def settings(self) -> dict[str, Any]:
        return {"model": "gan", **self.source, "caption_encoder": self.gan.hparams.caption_encoder}

    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        """Sentence vectors [n, D] as the GAN saw them in training (stored as float16)."""
        self.caption_encoder.to(self.device)
        return self.caption_encoder.encode(list(captions)).to(torch.float16).float()

    def noise(self, count: int, seed: int) -> torch.Tensor:
        """[count, noise_dim]: row ``j`` from a CPU generator seeded ``seed + j``."""
        rows = [
            torch.randn(self.gan.noise_dim, generator=torch.Generator().manual_seed(seed + j))
            for j in range(count)
        ]
        return torch.stack(rows)

    @torch.no_grad()
    def __call__(
        self,
        prompts: Sequence[str],
        num_images_per_prompt: int = 1,
        seed: int = 0,
        on_step: StepCallback | None = None,
    ) -> torch.Tensor:
        if not prompts:
            raise ValueError("Give at least one caption.")
        images = self.draw(self.encode(prompts), num_images_per_prompt, seed)
        if on_step is not None:
            on_step(1, 1)  # one forward pass: the whole generation is one step
        return images

    @torch.no_grad()
    def draw(
        self, text_features: torch.Tensor, num_images_per_prompt: int = 1, seed: int = 0
    ) -> torch.Tensor:
        """Images for already encoded captions [n, D], the same noise for every caption."""
        count, per_caption = len(text_features), num_images_per_prompt
        noise = self.noise(per_caption, seed).repeat(count, 1).to(self.device)
        features = text_features.to(self.device).repeat_interleave(per_caption, dim=0)
        images = self.gan.generate(features, noise)
        return ((images.float().cpu() + 1) / 2).clamp(0, 1).view(count, per_caption, *images.shape[1:])
