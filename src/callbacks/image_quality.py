"""FID and Inception Score of generated images, computed during validation and test.

The LightningModule's ``validation_step`` / ``test_step`` returns ``{"real": Tensor[B, 3, H, W], "fake": Tensor[B,
3, H, W]}`` with values in [-1, 1]; this callback feeds both to FID and the fakes to IS, and logs ``val/fid``,
``val/is``, ``val/is_std`` (``test/...`` in testing) once per evaluation epoch.

Interplay with checkpointing: on validation epochs skipped by ``every_n_epochs`` no ``val/fid`` is logged (a
stale value would be misleading), and ``ModelCheckpoint(monitor="val/fid")`` raises when the key is missing on an
epoch it checks. Use the same cadence for both, e.g. ``ModelCheckpoint(monitor="val/fid", mode="min",
every_n_epochs=N)`` with ``ImageQualityMetrics(every_n_epochs=N)`` — both act after epochs where
``(epoch + 1) % N == 0`` — or run validation itself only every N epochs (``trainer.check_val_every_n_epoch=N``)
and keep ``every_n_epochs=1`` here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any, Literal

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from src.metrics.image_quality import ImageQuality, build_inception

__all__ = ["ImageQualityMetrics"]


class ImageQualityMetrics(Callback):
    """Log FID (real vs fake) and IS (fake) of the images returned by validation_step / test_step."""

    def __init__(
        self,
        feature_extractor: Literal["inception"] | torch.nn.Module = "inception",
        weights_path: str | os.PathLike | None = None,
        every_n_epochs: int = 1,
        max_samples: int | None = None,
        splits: int = 10,
        download: bool = False,
        cache_real_features: bool = False,
        seed: int = 0,
    ) -> None:
        """``feature_extractor``: "inception" (the standard FID network, what papers report) or any module with
        its interface (numbers then compare only with themselves). ``max_samples`` caps real and fake images per
        evaluation (over all processes); ``splits`` is IS's."""
        super().__init__()
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if max_samples is not None and max_samples < 2:
            raise ValueError(f"max_samples must be >= 2 (FID needs two images per side), got {max_samples}")
        self.feature_extractor = feature_extractor
        self.weights_path = weights_path
        self.every_n_epochs = every_n_epochs
        self.max_samples = max_samples
        self.splits = splits
        self.download = download
        # The validation set does not change, so its real statistics can be computed once (test set: its own).
        self.cache_real_features = cache_real_features
        self.seed = seed
        self._metrics: dict[str, ImageQuality] = {}
        self._extractor: torch.nn.Module | None = None
        self._active: dict[str, bool] = {}
        self._seen: dict[str, dict[str, int]] = {}
        self._warned_outputs = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Built before any epoch so a missing Inception file fails at once, not after the first training epoch.
        if self._extractor is None:
            if isinstance(self.feature_extractor, torch.nn.Module):
                self._extractor = self.feature_extractor
            elif self.feature_extractor == "inception":
                self._extractor = build_inception(self.weights_path, self.download)
            else:
                raise ValueError(
                    f"feature_extractor must be 'inception' or a feature extractor module, got {self.feature_extractor!r}"
                )

    def report_notes(self) -> list[str]:
        """What a reader of the metrics table must know about these numbers."""
        if isinstance(self.feature_extractor, torch.nn.Module):
            name = type(self.feature_extractor).__name__
            return [
                f"IS and FID use {name}, not the standard FID Inception: they compare only with other numbers "
                f"from {name}, never with published IS/FID."
            ]
        return ["IS and FID use the standard FID Inception (torch-fidelity's port of the TF network)."]

    def _metric(self, stage: str) -> ImageQuality:
        if stage not in self._metrics:
            self._metrics[stage] = ImageQuality(
                self._extractor, splits=self.splits, seed=self.seed, cache_real=self.cache_real_features
            )
        return self._metrics[stage]

    def _is_active(self, trainer: Trainer, stage: str) -> bool:
        if stage == "test":
            return True
        if trainer.sanity_checking:
            return False
        # Only the fit loop has a cadence; trainer.validate(...) always measures.
        if trainer.state.fn != TrainerFn.FITTING:
            return True
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _start(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._active[stage] = self._is_active(trainer, stage)
        if not self._active[stage]:
            return
        metric = self._metric(stage).to(pl_module.device)
        metric.reset()
        skip_real = self.cache_real_features and metric.has_real
        self._seen[stage] = {"real": 0 if not skip_real else -1, "fake": 0}

    def _update(self, trainer: Trainer, stage: str, outputs: Any) -> None:
        if not self._active.get(stage):
            return
        if not (isinstance(outputs, Mapping) and "real" in outputs and "fake" in outputs):
            if not self._warned_outputs:
                rank_zero_warn(
                    f"ImageQualityMetrics: {stage} step returned {type(outputs).__name__}, expected "
                    '{"real": images, "fake": images} in [-1, 1]; batch ignored.'
                )
                self._warned_outputs = True
            return
        # Each process takes its share of the global cap; torchmetrics sums the shares when syncing.
        limit = math.ceil(self.max_samples / trainer.world_size) if self.max_samples is not None else None
        metric = self._metrics[stage]
        seen = self._seen[stage]
        for side in ("real", "fake"):
            if seen[side] < 0:  # cached real statistics
                continue
            images = outputs[side].detach()
            if limit is not None:
                images = images[: max(0, limit - seen[side])]
            if images.shape[0] == 0:
                continue
            # [-1, 1] -> [0, 1]; the extractor quantises to uint8 itself where its reference does.
            metric.update(((images.float() + 1) / 2).clamp(0, 1), real=side == "real")
            seen[side] += images.shape[0]

    def _end(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not self._active.get(stage):
            return
        metric = self._metrics[stage]
        try:
            values = metric.compute()
        except RuntimeError as error:
            raise RuntimeError(
                f"ImageQualityMetrics could not compute {stage} FID/IS: {error} "
                f"(does {stage}_step return real and fake images, and is max_samples >= 2?)"
            ) from error
        for name, value in values.items():
            # Already identical on every rank after torchmetrics' sync; sync_dist keeps Lightning's books straight.
            pl_module.log(f"{stage}/{name}", value.to(pl_module.device), sync_dist=True)
        metric.reset()  # IS keeps every logit; free them between evaluations
        self._active[stage] = False

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(trainer, pl_module, "val")

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._update(trainer, "val", outputs)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(trainer, pl_module, "test")

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._update(trainer, "test", outputs)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end(trainer, pl_module, "test")
