"""A fixed set of captions drawn by the model after validation epochs: one grid row per caption.

Works with any LightningModule that draws (see ``src/pipelines/loading.py``: ``text_to_image_for``). Every row uses the same seeded noise, so column ``j`` differs between rows only by the
caption: an English and a Korean caption of the same meaning should give similar rows (the thesis' qualitative
check). The captions are printed beside their rows (Hangul included).
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger

from src.pipelines.loading import text_to_image_for
from src.utils.image_grid import captioned_grid, save_grid
from src.utils.run import output_root

__all__ = ["CaptionSampleGrid"]


class CaptionSampleGrid(Callback):
    """Render ``captions`` every ``every_n_epochs`` validation epochs into ``filename`` (rank 0 only; PNG + W&B)."""

    def __init__(
        self,
        captions: list[str],
        every_n_epochs: int = 1,
        num_per_caption: int = 4,
        seed: int = 0,
        filename: str = "samples/epoch_{epoch:03d}.png",
    ) -> None:
        super().__init__()
        if not captions:
            raise ValueError("CaptionSampleGrid needs at least one caption.")
        self.captions = [str(c) for c in captions]
        self.every_n_epochs = every_n_epochs
        self.num_per_caption = num_per_caption
        self.seed = seed
        self.filename = filename
        self.last_path: Path | None = None

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        images = self.render(pl_module)
        path = output_root(trainer) / self.filename.format(
            epoch=trainer.current_epoch, step=trainer.global_step
        )
        self.last_path = save_grid(captioned_grid(list(images), self.captions), path)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="samples", images=[str(self.last_path)], step=trainer.global_step)

    def render(self, pl_module: LightningModule) -> torch.Tensor:
        """[captions, num_per_caption, 3, H, W] images in [0, 1], drawn by the module's current weights."""
        return text_to_image_for(pl_module)(self.captions, self.num_per_caption, self.seed)
