"""Where a training stream stands, so that a run killed mid-epoch resumes on exactly the batches it would have seen.

Every random draw of the loaders is seeded from (seed, epoch, rank, worker) or (seed, epoch, sample key)
(:mod:`src.utils.seeding`), so an epoch's batches follow from its number alone. What a checkpoint must hold is
therefore small: the epoch, and how many of its batches were trained on. On resume the loader starts that epoch
again and drops those batches in the main process, so every worker reads its usual share in its usual order
(dropping them inside the workers would shift the DataLoader's round-robin over them). Dropped batches cost their
decoding, at most one epoch's worth, once.

This is the DataModule's own state (``state_dict``/``load_state_dict``), which Lightning restores before it
builds the loaders; Lightning's stateful-loader path breaks when a module reads ``estimated_stepping_batches``
first (Lightning issue 20550), as the CLIP module does.
"""

from __future__ import annotations

import multiprocessing
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from src.utils.seeding import derived_seed

__all__ = ["PositionedDataModule", "ResumableLoader", "SharedEpoch", "TrainingPosition"]


class SharedEpoch:
    """An epoch number shared with DataLoader workers, which read it when they start an epoch (as in open_clip)."""

    def __init__(self, epoch: int = 0):
        # A spawn-context lock: it also crosses into `ddp_spawn` processes, which a fork-context one may not.
        self.value = multiprocessing.get_context("spawn").Value("i", epoch)

    def set(self, epoch: int) -> None:
        self.value.value = epoch

    def get(self) -> int:
        return self.value.value


class TrainingPosition:
    """The epoch a training loader is drawing and the batches of it already trained on.

    Each ``iter()`` of the training loader starts the next epoch (Lightning calls it once per epoch); after
    :meth:`load_state_dict` the first one restarts the saved epoch and drops the saved number of batches.
    """

    def __init__(self) -> None:
        self.epoch = SharedEpoch()
        self.batches_done = 0
        self._next: tuple[int, int] = (0, 0)  # the epoch the next iter() starts, and the batches it drops

    def start_epoch(self) -> int:
        """Called as an epoch's loader iteration begins; returns the number of batches to drop."""
        epoch, resumed = self._next
        self.epoch.set(epoch)  # before the workers start this epoch: they read it first
        self.batches_done = resumed
        self._next = (epoch + 1, 0)
        return resumed

    def batch_trained(self) -> None:
        self.batches_done += 1

    def state_dict(self, batches_per_epoch: int | float) -> dict[str, int]:
        """``{"epoch", "batches_done"}``; a finished epoch is saved as the start of the next."""
        epoch = self.epoch.get()
        if self.batches_done >= batches_per_epoch:
            return {"epoch": epoch + 1, "batches_done": 0}
        return {"epoch": epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._next = (int(state.get("epoch", 0)), int(state.get("batches_done", 0)))


class ResumableLoader(DataLoader):
    """A DataLoader whose iterations start at its :class:`TrainingPosition` (none: a plain DataLoader).

    A sampler with its own ``generator`` (``RandomSampler(dataset, generator=torch.Generator())``) has it re-seeded
    from ``position_seed`` and the epoch, so an epoch's order does not depend on the epochs drawn before it. (Not
    the loader's ``generator``: a fresh loader iterator, as a resumed run builds, draws its workers' base seed
    from that one first.)
    """

    def __init__(
        self, *args: Any, position: TrainingPosition | None = None, position_seed: int = 0, **kwargs: Any
    ) -> None:
        # init arguments, not attributes set later: Lightning rebuilds a DataLoader from its init arguments when
        # it swaps in a distributed sampler
        super().__init__(*args, **kwargs)
        self.position = position
        self.position_seed = position_seed

    def __iter__(self):
        if self.position is None:
            return super().__iter__()
        drop = self.position.start_epoch()
        order = getattr(self.sampler, "generator", None)
        if order is not None:
            order.manual_seed(derived_seed(self.position_seed, "order", self.position.epoch.get()))
        batches = super().__iter__()
        for _ in range(drop):
            next(batches)
        return batches


class PositionedDataModule(L.LightningDataModule):
    """A DataModule whose training loader is a :class:`ResumableLoader` at ``self.position``: it counts the batches
    trained and keeps the position in its checkpointed state. Subclasses extend the two state hooks with their own
    (calling ``super()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.position = TrainingPosition()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training:
            self.position.batch_trained()
        return batch

    def state_dict(self) -> dict[str, Any]:
        batches = self.trainer.num_training_batches if self.trainer is not None else float("inf")
        return {"position": self.position.state_dict(batches)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.position.load_state_dict(state_dict.get("position", {}))
