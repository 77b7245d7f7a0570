"""DreamBooth (Ruiz et al. 2023): fine-tune the whole UNet on a few images of one subject, named in the prompt by
a rare identifier ("a photo of sks house"), while a prior-preservation loss on images the base model drew for
the bare class ("a photo of a house") keeps it from forgetting the class or drifting.

The data side holds the method: the instance prompt and the class images (generated once with the base model and
cached) come from the datamodule's ``instance_prompt`` and ``prior_preservation`` settings, and every batch is
instance images followed by class images. The loss is the shared one of :class:`StableDiffusionFineTune`:
instance loss + ``prior_loss_weight`` x prior loss. DreamBooth + LoRA is the LoRA module on the same data.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from src.modules.diffusion.full import FullFineTune

__all__ = ["DreamBooth"]


class DreamBooth(FullFineTune):
    method = "dreambooth"

    def __init__(self, *args, prior_loss_weight: float = 1.0, **kwargs) -> None:
        super().__init__(*args, prior_loss_weight=prior_loss_weight, **kwargs)
        self._warned_without_prior = False

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        is_prior = batch.get("is_prior")
        if not self._warned_without_prior and self.hparams.prior_loss_weight > 0:
            if is_prior is None or not bool(is_prior.any()):
                # Legitimate (the paper's ablation), but usually a forgotten data.prior_preservation setting.
                rank_zero_warn(
                    "DreamBooth without class images: set data.prior_preservation for the prior loss."
                )
            self._warned_without_prior = True
        return super().training_step(batch, batch_idx)
