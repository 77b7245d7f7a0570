"""The loaders of a DataModule whose train, val and test datasets are generated scenes held in memory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from src.data.position import PositionedDataModule, ResumableLoader
from src.utils.workers import die_with_parent

__all__ = ["GeneratedSplitsDataModule"]


class GeneratedSplitsDataModule(PositionedDataModule):
    """Loaders over ``self.datasets`` (split -> dataset), which a subclass fills; hparams ``batch_size``,
    ``eval_batch_size``, ``num_workers`` and ``shuffle_seed``. The training split is shuffled in an order drawn
    from (shuffle_seed, epoch), resumable mid-epoch (src/data/position.py), and drops a last partial batch;
    evaluation splits are read in order, whole."""

    datasets: dict[str, Dataset]
    collate_fn: Callable[[list[Any]], Any] | None = None

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self.datasets[split]
        if len(dataset) == 0:
            raise ValueError(
                f"The {split} split is empty: raise data.num_samples or its data.split_fractions."
            )
        batch_size = (
            self.hparams.batch_size if shuffle else self.hparams.eval_batch_size or self.hparams.batch_size
        )
        workers = self.hparams.num_workers
        return ResumableLoader(
            dataset,
            position=self.position if shuffle else None,
            position_seed=self.hparams.shuffle_seed,
            batch_size=batch_size,
            sampler=RandomSampler(dataset, generator=torch.Generator()) if shuffle else None,
            drop_last=shuffle and len(dataset) >= batch_size,
            collate_fn=self.collate_fn,
            num_workers=workers,
            persistent_workers=workers > 0,
            worker_init_fn=die_with_parent if workers > 0 else None,
        )
