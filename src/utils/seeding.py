"""Seeds derived from the run's seed and a position (epoch, batch, rank, worker, sample key).

A random draw seeded from where it happens, rather than from whatever state a generator has reached, comes out
the same however the run got there: uninterrupted, or killed and resumed from a checkpoint with fresh loader
workers; with any number of workers. ``hash()`` cannot derive them: Python salts the hashes of strings per
process.

:class:`StepSeeds` applies this to a model's own draws (dropout, diffusion noise and timesteps, a GAN's latent
vectors), which come from the main process's global generators. Lightning saves no generator state, and what draws
from them between two steps differs between an uninterrupted run and a resumed one (a resumed run builds fresh
loader iterators and sanity-checks first). Seeding each step from (seed, epoch, batch index, rank) makes a step's
draws a function of where the step is, so a run resumed from any checkpoint continues exactly as the uninterrupted
run did, with nothing to save; seeding each evaluation from (seed, stage) makes evaluating a checkpoint twice give
the same numbers.
"""

from __future__ import annotations

import hashlib
import random

import lightning as L
import numpy as np
import torch

__all__ = ["StepSeeds", "derived_seed", "seed_all"]


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts`` (ints, strings), the same in every process and on every machine."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seed_all(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (every CUDA device's included)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
