"""Step timing in the logs: samples/s, data-loading time and batch time, as open_clip reports them."""

from __future__ import annotations

import time

import lightning as L


class StepThroughput(L.Callback):
    """Logs ``perf/samples_per_sec``, ``perf/data_time`` and ``perf/batch_time`` for training steps."""

    def __init__(self) -> None:
        super().__init__()
        self._batch_end: float | None = None
        self._batch_start: float | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._batch_end = time.perf_counter()  # data time of the first batch counts from the epoch start

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_start = time.perf_counter()
        if self._batch_end is not None:
            pl_module.log("perf/data_time", self._batch_start - self._batch_end, on_step=True, on_epoch=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._batch_end is None:
            return
        batch_time = now - self._batch_end  # data loading + step, as open_clip's batch_time
        samples = (
            len(batch["image"]) * trainer.world_size if isinstance(batch, dict) and "image" in batch else 0
        )
        pl_module.log("perf/batch_time", batch_time, on_step=True, on_epoch=False)
        if samples and batch_time > 0:
            pl_module.log("perf/samples_per_sec", samples / batch_time, on_step=True, on_epoch=False)
        self._batch_end = now
