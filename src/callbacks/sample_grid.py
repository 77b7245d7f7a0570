"""A fixed set of bilingual captions rendered by the generator after validation epochs: one grid row per caption.

Every row uses the same seeded noise, so column ``j`` differs between rows only by the caption: an English and a
Korean caption of the same meaning should give similar rows (the thesis's qualitative check). Captions are not
drawn into the image (Hangul needs a font that may be missing); a sidecar ``.txt`` lists them row by row.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from omegaconf import OmegaConf

__all__ = ["CaptionSampleGrid", "save_caption_grid"]


def save_caption_grid(
    images: torch.Tensor, captions: list[str], path: str | os.PathLike, per_caption: int
) -> Path:
    """Save images [len(captions) * per_caption, 3, H, W] in [-1, 1] as one PNG (row = caption) plus a ``.txt``."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image((images.float().cpu() + 1) / 2, path, nrow=per_caption, padding=2, value_range=(0, 1))
    rows = [f"row {i}: {caption}" for i, caption in enumerate(captions)]
    path.with_suffix(".txt").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


class CaptionSampleGrid(Callback):
    """Render ``captions`` with ``pl_module.generate`` every ``every_n_epochs`` validation epochs (rank 0 only)."""

    def __init__(
        self,
        captions: list[str],
        encoder: dict[str, Any] | None = None,
        features_dir: str | os.PathLike | None = None,
        every_n_epochs: int = 1,
        num_per_caption: int = 4,
        seed: int = 0,
        filename: str = "samples/epoch_{epoch:03d}.png",
    ) -> None:
        """``features_dir`` (encoder of the precomputed features, preferred) or ``encoder`` (TextFeatureEncoder kwargs)."""
        super().__init__()
        if not captions:
            raise ValueError("CaptionSampleGrid needs at least one caption.")
        if (encoder is None) == (features_dir is None):
            raise ValueError(
                "Give exactly one of features_dir (recommended: the training features' encoder) or encoder."
            )
        if OmegaConf.is_config(encoder):
            encoder = OmegaConf.to_container(encoder, resolve=True)
        self.captions = [str(c) for c in captions]
        self.encoder = dict(encoder) if encoder is not None else None
        self.features_dir = features_dir
        self.every_n_epochs = every_n_epochs
        self.num_per_caption = num_per_caption
        self.seed = seed
        self.filename = filename
        self.text_features: torch.Tensor | None = None
        self.last_path: Path | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero or self.text_features is not None:
            return
        from src.data.text_features import TextFeatureEncoder, load_text_encoder_from_features

        if self.features_dir is not None:
            encoder = load_text_encoder_from_features(self.features_dir, device=pl_module.device)
        else:
            encoder = TextFeatureEncoder(**{**self.encoder, "device": pl_module.device})
        # Rounded through float16 like the stored features, so the generator sees the values it trained on.
        self.text_features = encoder.encode(self.captions).to(torch.float16).float()
        del encoder  # BERT is only needed once; free its memory for training

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self.text_features is None:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        features = self.text_features.to(pl_module.device)
        rows = []
        with torch.no_grad():
            for feature in features:
                # A fresh generator per caption: every row gets the same noise.
                generator = torch.Generator().manual_seed(self.seed)
                batch = feature.unsqueeze(0).expand(self.num_per_caption, -1)
                rows.append(pl_module.generate(batch, generator=generator).detach().float().cpu())
        path = _output_root(trainer) / self.filename.format(
            epoch=trainer.current_epoch, step=trainer.global_step
        )
        self.last_path = save_caption_grid(torch.cat(rows), self.captions, path, self.num_per_caption)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                caption = " | ".join(f"{i}: {c}" for i, c in enumerate(self.captions))
                logger.log_image(key="samples", images=[str(self.last_path)], caption=[caption])


def _output_root(trainer: Trainer) -> Path:
    """``trainer.log_dir``; with W&B first, ``save_dir/project/run_id`` like Lightning's checkpoints, so runs don't clash."""
    logger = trainer.loggers[0] if trainer.loggers else None
    if isinstance(logger, WandbLogger) and logger.save_dir:
        return Path(logger.save_dir) / str(logger.name) / str(logger.version)
    return Path(trainer.log_dir or trainer.default_root_dir)
