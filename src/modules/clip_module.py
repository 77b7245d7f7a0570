"""Contrastive training of the bilingual dual encoder on treatment-webtoon pairs (thesis chapter IV)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from src.modules.clip_loss import ContrastiveLoss, contrastive_accuracy
from src.modules.dual_encoder import DualEncoder


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warmup, then cosine decay to ``min_ratio`` (a pure function of the step)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class WebtoonCLIP(L.LightningModule):
    """Symmetric InfoNCE over image and caption embeddings; features gathered across DDP ranks with gradients.

    Validation and test steps return the embeddings of every image and every caption of the batch, which
    :class:`src.callbacks.retrieval.RetrievalMetrics` turns into MRR@K and recall both ways.
    """

    def __init__(
        self,
        text_encoder: dict[str, Any],
        image_encoder: dict[str, Any],
        optimizer: Callable[..., torch.optim.Optimizer],
        projection_dim: int = 512,
        logit_scale_init: float = math.log(1 / 0.07),
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        local_loss: bool = False,
        zero_shot_labels: list[str] | None = None,
        zero_shot_template: str = "{}",
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.encoder = DualEncoder(text_encoder, image_encoder, projection_dim, logit_scale_init)
        self.loss = ContrastiveLoss(local_loss=local_loss)

    # ---- the method ---------------------------------------------------------------------------------
    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(batch["image"], batch["input_ids"], batch["attention_mask"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        image_features, text_features = self(batch)
        loss = self.loss(image_features, text_features, self.encoder.logit_scale)
        batch_size = len(batch["image"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log(
            "train/accuracy",
            contrastive_accuracy(image_features, text_features),
            prog_bar=True,
            batch_size=batch_size,
        )
        self.log("train/logit_scale", self.encoder.logit_scale, batch_size=batch_size)
        return loss

    def on_fit_start(self) -> None:
        tokenizer = getattr(self.trainer.datamodule, "tokenizer", None)
        embeddings = self.encoder.model.text_model.get_input_embeddings().num_embeddings
        if tokenizer is not None and len(tokenizer) > embeddings:
            raise ValueError(
                f"The tokenizer ({len(tokenizer)} tokens) does not fit the text tower ({embeddings} embeddings): "
                "point data.tokenizer at the text encoder's own tokenizer or raise its vocab_size."
            )

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.encoder.clamp_logit_scale()

    def validation_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._evaluation_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._evaluation_step(batch, "test")

    def _evaluation_step(self, batch: dict, stage: str) -> dict[str, torch.Tensor]:
        image_features, text_features = self(batch)
        batch_size = len(batch["image"])
        # Loss and accuracy on the local batch only: sync_dist averages them once at epoch end.
        logits = self.encoder.logit_scale * image_features @ text_features.T
        labels = torch.arange(batch_size, device=logits.device)
        loss = (
            nn.functional.cross_entropy(logits, labels) + nn.functional.cross_entropy(logits.T, labels)
        ) / 2
        self.log(f"{stage}/loss", loss, sync_dist=True, batch_size=batch_size)
        self.log(
            f"{stage}/accuracy",
            contrastive_accuracy(image_features, text_features),
            sync_dist=True,
            batch_size=batch_size,
        )
        all_text = self.encoder.encode_text(batch["all_input_ids"], batch["all_attention_mask"])
        return {
            "image_embeds": image_features,
            "text_embeds": all_text,
            "caption_image_index": batch["caption_image_index"],
        }

    # ---- optimisation -------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict:
        # No weight decay on biases, norms and the temperature, as CLIP and open_clip do.
        decay, no_decay = [], []
        for name, parameter in self.named_parameters():
            if not parameter.requires_grad:
                continue
            is_gain_or_bias = parameter.ndim < 2 or "norm" in name or "logit_scale" in name
            (no_decay if is_gain_or_bias else decay).append(parameter)
        optimizer = self.hparams.optimizer(
            params=[{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        )
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_cosine(
                step, self.hparams.warmup_steps, total_steps, self.hparams.min_lr_ratio
            ),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ---- after training -----------------------------------------------------------------------------
    def export(self, out_dir: str, datamodule) -> None:
        """A directory that ``VisionTextDualEncoderModel.from_pretrained`` and its processor load as it is."""
        hp = datamodule.hparams
        self.encoder.export(out_dir, datamodule.tokenizer, hp.image_size, hp.image_mean, hp.image_std)

    def export_text_encoder(self, out_dir: str, datamodule) -> None:
        """The trained text tower and its tokenizer alone (any pooling), e.g. as the DCGAN's sentence encoder."""
        self.encoder.model.text_model.save_pretrained(out_dir)
        datamodule.tokenizer.save_pretrained(out_dir)

    def write_analyses(self, datamodule, out_dir, callbacks=()) -> dict:
        """Similarity table, PCA plot, retrieval grid, zero-shot labels and the image index of the test split."""
        from src.modules.clip_analysis import write_clip_report

        hp = datamodule.hparams
        self.eval()
        return write_clip_report(
            self.encoder,
            datamodule.tokenizer,
            datamodule.test_dataloader(),
            Path(out_dir),
            hp.image_mean,
            hp.image_std,
            list(self.hparams.zero_shot_labels or []),
            self.hparams.zero_shot_template,
        )
