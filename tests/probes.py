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


class LastCheckpointSteps(L.Callback):
    """Records, after every training batch, the global step held by ``last.ckpt`` in ``dirpath`` (None: none)."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath
        self.seen: list[tuple[int, int | None]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from pathlib import Path

        import torch

        last = Path(self.dirpath) / "last.ckpt"
        step = (
            torch.load(last, map_location="cpu", weights_only=False)["global_step"]
            if last.is_file()
            else None
        )
        self.seen.append((trainer.global_step, step))
