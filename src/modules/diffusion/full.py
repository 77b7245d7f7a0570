"""Full fine-tuning, the text-to-image baseline: every UNet weight (and optionally the text encoder's) trains.

Exports a complete diffusers pipeline directory (``save_pretrained``), which ``StableDiffusionPipeline
.from_pretrained(dir)`` loads in place of the base model.
"""

from __future__ import annotations

from pathlib import Path

from src.modules.diffusion.components import save_pipeline_directory
from src.modules.diffusion.finetune import StableDiffusionFineTune

__all__ = ["FullFineTune"]


class FullFineTune(StableDiffusionFineTune):
    method = "full"

    def __init__(self, *args, train_text_encoder: bool = False, **kwargs) -> None:
        self.train_text_encoder = train_text_encoder
        super().__init__(*args, **kwargs)

    def add_trainable_parts(self) -> None:
        self.unet.requires_grad_(True)
        if self.train_text_encoder:
            self.text_encoder.requires_grad_(True)

    def export_weights(self, out_dir: Path) -> None:
        save_pipeline_directory(self.diffusion_parts(), out_dir)
