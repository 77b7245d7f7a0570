"""Callbacks that tests add to real runs (in subprocesses) to observe them."""

from __future__ import annotations

import json

import lightning as L


class FirstBatchKeys(L.Callback):
    """Appends ``{"rank", "epoch", "keys"}`` of each epoch's first training batch to a JSON-lines file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            record = {"rank": trainer.global_rank, "epoch": trainer.current_epoch, "keys": list(batch["key"])}
            with open(self.path, "a") as out:
                out.write(json.dumps(record) + "\n")


class TrainedParameterSnapshot(L.Callback):
    """Keeps a copy of every trainable parameter when training starts (after a resumed checkpoint is restored),
    and the first training batch."""

    def __init__(self) -> None:
        self.initial: dict = {}
        self.first_batch: dict | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.initial = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first_batch is None:
            self.first_batch = batch


class KillAtStep(L.Callback):
    """SIGKILLs its own process as training step ``step`` (a global step) is about to run: a crash at a known point."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import os
        import signal

        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
