"""``last.ckpt`` every N optimizer steps, mid-epoch too: what a crashed or requeued run resumes from.

Lightning's ``ModelCheckpoint`` defers a step save until its monitored metric exists, so a callback that keeps
the best checkpoint by a validation metric writes nothing between validations, ``last.ckpt`` included (measured:
``every_n_train_steps=40`` over a 186-step epoch wrote nothing before the end). This callback monitors nothing:
it writes the trainer's whole state (weights, optimizers, schedulers, loops, callbacks, the DataModule's state)
through ``trainer.save_checkpoint`` into a temporary file and renames it over ``last.ckpt``, so a kill during the
write leaves the previous one whole.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Checkpoint

__all__ = ["StepCheckpoint"]


class StepCheckpoint(Checkpoint):
    """Writes ``dirpath/last.ckpt`` after every ``every_n_train_steps``-th optimizer step (0: never)."""

    def __init__(self, dirpath: str | os.PathLike, every_n_train_steps: int = 0) -> None:
        if every_n_train_steps < 0:
            raise ValueError(
                f"callbacks.step_checkpoint.every_n_train_steps must be >= 0 (0: off), got {every_n_train_steps}"
            )
        self.dirpath = Path(dirpath)
        self.every_n_train_steps = every_n_train_steps
        self._saved_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        step = trainer.global_step
        # with gradient accumulation several batches end at one global step: the first after the step saves it
        if not self.every_n_train_steps or step % self.every_n_train_steps or step == self._saved_step:
            return
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        partial = self.dirpath / "last.ckpt.partial"
        trainer.save_checkpoint(partial)  # every rank calls it; rank zero writes
        if trainer.is_global_zero:
            os.replace(partial, self.dirpath / "last.ckpt")
        self._saved_step = step
