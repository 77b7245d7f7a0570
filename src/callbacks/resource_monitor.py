"""Wall time and peak memory of training, logged and kept for benchmark scripts.

Step time is wall time per optimizer step with everything in it (data loading, callbacks such as validation
grids, validation loops), averaged over the steps since the last log. Peak memory is the device's peak
allocation on CUDA (reset when training starts) and, on CPU, the peak resident set size of the main process
(data-loader workers not included), which the OS keeps for the process's whole life.
"""

from __future__ import annotations

import resource
import sys
from time import perf_counter

import torch
from lightning import Callback, LightningModule, Trainer

__all__ = ["ResourceMonitor", "peak_memory_mb"]


class ResourceMonitor(Callback):
    """Logs ``train/step_time_s`` and ``train/peak_memory_mb`` every ``trainer.log_every_n_steps`` steps, and
    ``train/time_s`` and ``train/steps`` (with the last two) at train end; ``time_s`` and ``peak_memory_mb`` keep the final values."""

    def __init__(self) -> None:
        super().__init__()
        self.time_s: float | None = None
        self.peak_memory_mb: float | None = None
        self.step_time_s: float | None = None
        self._start = 0.0
        self._window_start = 0.0
        self._window_steps = 0
        self._last_step = 0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._start = self._window_start = perf_counter()
        self._window_steps = 0
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args) -> None:
        # Count optimizer steps, not batches: with gradient accumulation several batches make one step.
        self._window_steps += trainer.global_step - self._last_step
        self._last_step = trainer.global_step
        every = trainer.log_every_n_steps  # 0 turns step logging off; train end still logs
        if self._window_steps and every and trainer.global_step % every == 0:
            self._log(trainer, self._close_window(pl_module))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        metrics = self._close_window(pl_module) if self._window_steps else {}
        self.time_s = perf_counter() - self._start
        self.peak_memory_mb = peak_memory_mb(pl_module.device)
        totals = {
            "train/time_s": self.time_s,
            "train/peak_memory_mb": self.peak_memory_mb,
            "train/steps": float(trainer.global_step),
        }
        self._log(trainer, {**metrics, **totals})
        # Also into the run's final metrics (metrics.json / metrics.md), which train.py reads from here.
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in totals.items()})

    def _close_window(self, pl_module: LightningModule) -> dict[str, float]:
        now = perf_counter()
        self.step_time_s = (now - self._window_start) / self._window_steps
        self._window_start, self._window_steps = now, 0
        return {
            "train/step_time_s": self.step_time_s,
            "train/peak_memory_mb": peak_memory_mb(pl_module.device),
        }

    @staticmethod
    def _log(trainer: Trainer, metrics: dict[str, float]) -> None:
        # Straight to the loggers: Lightning forbids self.log in on_train_end.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA allocation on ``device``, else the process's peak resident set size, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux
