"""Seeds every training step, and every evaluation, from the run's seed and its position.

A model's own draws (dropout, diffusion noise and timesteps, a GAN's latent vectors) come from the global
generators of the main process. Lightning saves no generator state, and what draws from them between two steps
differs between an uninterrupted run and a resumed one (a resumed run builds fresh loader iterators and sanity
checks first). Seeding each step from (seed, epoch, batch index, rank) makes a step's draws a function of where
the step is, so a run resumed from any checkpoint continues exactly as the uninterrupted run did, with nothing to
save; seeding each evaluation from (seed, stage) makes evaluating a checkpoint twice give the same numbers.
"""

from __future__ import annotations

import lightning as L

from src.utils.seeding import derived_seed, seed_all

__all__ = ["StepSeeds"]


class StepSeeds(L.Callback):
    """Re-seeds Python, numpy and torch before every training batch and at the start of every evaluation."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        seed_all(derived_seed(self.seed, "train", trainer.current_epoch, batch_idx, trainer.global_rank))

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module) -> None:
        # the step it validates at: a validation's draws are the same in a resumed run
        stage = "sanity" if trainer.sanity_checking else "validate"
        seed_all(derived_seed(self.seed, stage, trainer.global_step, trainer.global_rank))

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module) -> None:
        seed_all(derived_seed(self.seed, "test", trainer.global_rank))

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module) -> None:
        seed_all(derived_seed(self.seed, "predict", trainer.global_rank))
