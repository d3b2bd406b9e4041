"""Shard-aware batches for ``DataLoader(batch_sampler=)`` over a :class:`pipeline.read.dataset.FeatureDataset`:
every batch is a run of consecutive rows inside one store shard, so it is one zarr selection."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from pipeline.errors import ConfigError

__all__ = ["ShardBatchSampler"]


class ShardBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices whose rows are consecutive and inside one shard, for ``DataLoader(batch_sampler=)``.

    Each batch is then one contiguous zarr selection in one shard (see
    :meth:`pipeline.read.dataset.FeatureDataset.__getitems__`). With
    ``shuffle`` the order of the batches is random per epoch (seeded by ``seed`` and :meth:`set_epoch`), and batch
    boundaries are shifted by a random offset per shard, so the same rows do not always travel together.

    Args:
        dataset: the :class:`pipeline.read.dataset.FeatureDataset` (its ``rows`` and ``rows_per_shard`` define the
            shards; nothing else of it is read).
        batch_size: rows per batch (a shard's last batch may be smaller unless ``drop_last``).
        shuffle: randomise batch order and boundaries per epoch.
        seed: base seed.
        drop_last: drop batches smaller than ``batch_size``.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ConfigError("batch_size must be >= 1")
        self.rows = np.asarray(dataset.rows)
        self.rows_per_shard = int(dataset.rows_per_shard)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _runs(self) -> list[np.ndarray]:
        """Dataset indices grouped by shard, split where rows are not consecutive (a failed row in between)."""
        if len(self.rows) == 0:
            return []
        shard = self.rows // self.rows_per_shard
        cut = np.flatnonzero((np.diff(shard) != 0) | (np.diff(self.rows) != 1)) + 1
        return np.split(np.arange(len(self.rows)), cut)

    def _batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        batches: list[list[int]] = []
        for run in self._runs():
            offset = int(rng.integers(0, self.batch_size)) if self.shuffle and len(run) > self.batch_size else 0
            edges = [0, *range(offset or self.batch_size, len(run), self.batch_size), len(run)]
            for a, b in zip(edges, edges[1:]):
                if b > a and (not self.drop_last or b - a == self.batch_size):
                    batches.append(run[a:b].tolist())
        if self.shuffle:
            perm = rng.permutation(len(batches))
            batches = [batches[i] for i in perm]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._batches()

    def __len__(self) -> int:
        return len(self._batches())
