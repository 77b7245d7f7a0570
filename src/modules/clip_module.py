"""Contrastive training of the bilingual dual encoder on treatment-webtoon pairs (thesis chapter IV)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from src.data.preprocess import Preprocess
from src.modules.clip_loss import ContrastiveLoss, contrastive_accuracy
from src.modules.dual_encoder import DualEncoder

# Thesis chapter IV: lr 1e-5; CLIP's AdamW settings. Used when no optimizer is given (e.g. loading to export).
CLIP_ADAMW = functools.partial(torch.optim.AdamW, lr=1e-5, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6)


class WebtoonCLIP(L.LightningModule):
    """Symmetric InfoNCE over image and caption embeddings; features gathered across DDP ranks with gradients.

    Validation and test steps return the embeddings of every image and every caption of the batch, which
    :class:`src.callbacks.retrieval.RetrievalMetrics` turns into MRR@K and recall both ways. The model owns its
    preprocessing (tokenizer, image size and statistics), so a checkpoint alone exports and analyses.
    """

    def __init__(
        self,
        text_encoder: dict[str, Any],
        image_encoder: dict[str, Any],
        preprocess: dict[str, Any],
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        projection_dim: int = 512,
        logit_scale_init: float = math.log(1 / 0.07),
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        local_loss: bool = False,
        decay_gains_and_biases: bool = False,
        analyses: dict[str, Any] | None = None,
    ):
        super().__init__()
        # The optimizer partial stays out of the hparams: checkpoints then load with weights_only=True.
        self.save_hyperparameters(ignore=["optimizer"], logger=False)
        self.preprocess = Preprocess.of(preprocess)
        self.encoder = DualEncoder(text_encoder, image_encoder, projection_dim, logit_scale_init)
        self.loss = ContrastiveLoss(local_loss=local_loss)
        self.optimizer = optimizer or CLIP_ADAMW

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
        # from_pretrained towers arrive in eval mode and Lightning keeps modes as they are: dropout must train.
        self.train()
        tokenizer = self.preprocess.loaded_tokenizer
        embeddings = self.encoder.model.text_model.get_input_embeddings().num_embeddings
        if tokenizer is not None and len(tokenizer) > embeddings:
            raise ValueError(
                f"The tokenizer ({len(tokenizer)} tokens) does not fit the text tower ({embeddings} embeddings): "
                "point model.preprocess.tokenizer at the text encoder's own tokenizer or raise its vocab_size."
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
        from transformers import get_cosine_with_min_lr_schedule_with_warmup

        # No weight decay on biases, norms and the temperature, as CLIP and open_clip do (unless asked for).
        decay, no_decay = [], []
        for name, parameter in self.named_parameters():
            if not parameter.requires_grad:
                continue
            is_gain_or_bias = parameter.ndim < 2 or "norm" in name or "logit_scale" in name
            exempt = is_gain_or_bias and not self.hparams.decay_gains_and_biases
            (no_decay if exempt else decay).append(parameter)
        optimizer = self.optimizer(params=[{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
        schedule = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer,
            num_warmup_steps=self.hparams.warmup_steps,
            num_training_steps=max(1, int(self.trainer.estimated_stepping_batches)),
            min_lr_rate=self.hparams.min_lr_ratio,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ---- after training -----------------------------------------------------------------------------
    def export(self, out_dir: str | Path) -> None:
        """A directory that ``VisionTextDualEncoderModel.from_pretrained`` and its processor load as it is."""
        self.encoder.export(str(out_dir), self.preprocess)

    def export_text_encoder(self, out_dir: str | Path) -> None:
        """The trained text tower and its tokenizer alone, e.g. as the DCGAN's sentence encoder."""
        self.encoder.model.text_model.save_pretrained(out_dir)
        self.preprocess.loaded_tokenizer.save_pretrained(out_dir)

    def write_analyses(self, dataloader, out_dir: str | Path) -> dict[str, Path]:
        """Similarity table, PCA plot, retrieval grid, zero-shot labels and the image index of a split."""
        from src.modules.clip_analysis import AnalysisSettings, write_clip_report

        self.eval()
        settings = AnalysisSettings(**(self.hparams.analyses or {}))
        return write_clip_report(self.encoder, self.preprocess, dataloader, Path(out_dir), settings)
