"""The loader interface over a tensor already in memory: for tests, benchmarks (the same loop fed
from RAM instead of the cache) and small experiments. Same contract as train/data.py's
ActivationLoader: `batches(epoch, batch)` is endless, and resuming at (e, b) yields exactly the
batches an uninterrupted iteration yields from there (each epoch is a permutation seeded by
(seed, epoch)).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TensorBatch:
    x: Tensor  # [B, d] or [B, L, d]
    epoch: int
    index: int


class TensorLoader:
    """Shuffled batches of rows of `data` [N, d] or [N, L, d]."""

    def __init__(self, data: Tensor, batch_size: int, *, seed: int = 0, shuffle: bool = True):
        if data.dim() not in (2, 3) or data.shape[0] == 0:
            raise ValueError(f"data must be a non-empty [N, d] or [N, L, d] tensor, got shape {tuple(data.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data, self.batch_size, self.seed, self.shuffle = data, batch_size, seed, shuffle
        self.rows_per_epoch = data.shape[0]
        self.batches_per_epoch = math.ceil(self.rows_per_epoch / batch_size)

    def order(self, epoch: int) -> Tensor:
        """[N] row order of `epoch`."""
        if not self.shuffle:
            return torch.arange(self.rows_per_epoch)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.rows_per_epoch, generator=g)

    def batches(self, epoch: int = 0, batch: int = 0) -> Iterator[TensorBatch]:
        while True:
            order = self.order(epoch)
            for index in range(batch, self.batches_per_epoch):
                rows = order[index * self.batch_size:(index + 1) * self.batch_size]
                yield TensorBatch(self.data[rows].contiguous(), epoch, index)
            epoch, batch = epoch + 1, 0

    def close(self) -> None:
        pass
