"""Device-to-host staging of shards assembled on a GPU: statistics first, then one copy to pinned memory.

On a side stream that waits for the producer's stream (so it sees every row appended so far), a
shard's float64 sums are computed on the GPU and the activations and sums are copied into a reused
pinned host buffer; an event marks the end. Nothing here blocks the producer: the writer's worker
threads wait for the event before they read the host buffer, and the GPU block is handed out again
only once the event has completed. Copies on their own stream overlap the producer's next forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .buffer import Pool
from .stats import device_row_sums


@dataclass
class PinnedShard:
    """Host side of one staged shard (pinned): acts [layers, shard_rows, d], sums [layers, d] float64,
    sq [layers, shard_rows] float64 (per-row squared norms); the first `rows` rows are the shard's."""

    acts: torch.Tensor
    sums: torch.Tensor
    sq: torch.Tensor


@dataclass
class Staged:
    host: PinnedShard
    rows: int
    event: torch.cuda.Event  # complete once `host` holds the shard


class CudaStager:
    """Stages shards from one CUDA device; `pinned` is the pool of PinnedShard the writer recycles."""

    def __init__(self, device: torch.device, pinned: Pool[PinnedShard]) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self.pinned = pinned

    def stage(self, acts: torch.Tensor, rows: int, pool: Pool[torch.Tensor]) -> Staged:
        """Queue statistics and the device-to-host copy of acts[:, :rows] (acts: a whole block taken
        from `pool`, given back to it here, to be reused once the copy is done)."""
        host = self.pinned.take()
        with torch.cuda.device(self.device):
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                part = acts[:, :rows]
                sums, sq = device_row_sums(part)
                for i in range(acts.shape[0]):  # contiguous per layer, also for a short last shard
                    host.acts[i, :rows].copy_(part[i], non_blocking=True)
                    host.sq[i, :rows].copy_(sq[i], non_blocking=True)
                host.sums.copy_(sums, non_blocking=True)
                event = torch.cuda.Event(blocking=True)  # waiters sleep instead of spinning a core
                event.record(self.stream)
        # The block was allocated on the producer's stream and is read on ours: the allocator must
        # not give its memory to anyone else before our copy ends, even if the pool drops it.
        acts.record_stream(self.stream)
        pool.give(acts, event)
        return Staged(host, rows, event)


def pinned_pool(shape: tuple[int, int, int], dtype: torch.dtype, keep: int) -> Pool[PinnedShard]:
    """Pool of pinned host shards of `shape` = (layers, shard_rows, d_model)."""
    n_layers, shard_rows, d_model = shape

    def make() -> PinnedShard:
        return PinnedShard(torch.empty(shape, dtype=dtype, pin_memory=True),
                           torch.empty((n_layers, d_model), dtype=torch.float64, pin_memory=True),
                           torch.empty((n_layers, shard_rows), dtype=torch.float64, pin_memory=True))

    return Pool(make, keep)
