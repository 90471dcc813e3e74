"""Device-to-host staging of shards assembled on a GPU: statistics first, then one copy to pinned memory.

On a side stream that waits for the producer's stream (so it sees every row appended so far), a
shard's float64 sums are computed on the GPU and the activations and sums are copied into a reused
pinned host buffer; an event marks the end. Nothing here blocks the producer: the writer's worker
threads wait for the event before they read the host buffer, and the GPU block is handed out again
only once the event has completed. Copies on their own stream overlap the producer's next forward.

An 8-bit cache (`encoded`) is encoded on the device too (cache/encoding.py, device-agnostic torch): the
codes and scales cross to the host (a quarter of the float32 rows' bytes), and the statistics are of the
decoded values, as on the host path.

The same class runs on a CPU "device" (no stream, no pinning, an event that is already complete): the
tests use it to exercise the writer's staging path without a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from . import encoding
from .buffer import Event, Pool
from .stats import device_row_sums


@dataclass
class HostShard:
    """Host side of one staged shard (pinned on CUDA): acts [layers, shard_rows, d], sums [layers, d]
    float64, sq [layers, shard_rows] float64 (per-row squared norms); the first `rows` rows are the shard's."""

    acts: torch.Tensor  # empty for an 8-bit cache: codes, row and col hold the shard instead
    sums: torch.Tensor
    sq: torch.Tensor
    codes: torch.Tensor | None = None  # 8-bit: int8 [layers, shard_rows, d]
    row: torch.Tensor | None = None  # 8-bit: float32 [layers, shard_rows]
    col: torch.Tensor | None = None  # 8-bit: float32 [layers, d]


class _Done:
    """The event of work that was not queued anywhere: already complete."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


@dataclass
class Staged:
    host: HostShard
    rows: int
    event: Event  # torch.cuda.Event (or _Done): complete once `host` holds the shard


class DeviceStager:
    """Stages shards from one device into a pool of host shards of `shape` = (layers, shard_rows, d)."""

    def __init__(self, device: torch.device, shape: tuple[int, int, int], dtype: torch.dtype, keep: int,
                 encoded: bool = False) -> None:
        self.device, self.encoded = device, encoded
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device=device) if self.cuda else None
        n_layers, shard_rows, d_model = shape

        def make() -> HostShard:
            pin = self.cuda
            sums = torch.empty((n_layers, d_model), dtype=torch.float64, pin_memory=pin)
            sq = torch.empty((n_layers, shard_rows), dtype=torch.float64, pin_memory=pin)
            if not encoded:
                return HostShard(torch.empty(shape, dtype=dtype, pin_memory=pin), sums, sq)
            return HostShard(torch.empty(0), sums, sq, torch.empty(shape, dtype=encoding.CODE_DTYPE, pin_memory=pin),
                             torch.empty((n_layers, shard_rows), dtype=encoding.SCALE_DTYPE, pin_memory=pin),
                             torch.empty((n_layers, d_model), dtype=encoding.SCALE_DTYPE, pin_memory=pin))

        self.pinned: Pool[HostShard] = Pool(make, keep)

    @contextlib.contextmanager
    def _side_stream(self) -> Iterator[None]:
        if not self.cuda:
            yield
            return
        assert self.stream is not None  # made whenever self.cuda
        with torch.cuda.device(self.device):
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                yield

    def stage(self, acts: torch.Tensor, rows: int, pool: Pool[torch.Tensor]) -> Staged:
        """Queue statistics and the device-to-host copy of acts[:, :rows] (acts: a whole block taken
        from `pool`, given back to it here, to be reused once the copy is done)."""
        host = self.pinned.take()
        with self._side_stream():
            part = acts[:, :rows]
            if self.encoded:
                assert host.codes is not None and host.row is not None and host.col is not None
                codes = [encoding.encode(part[i], check=False) for i in range(acts.shape[0])]  # no host sync
                sums, sq = device_row_sums(torch.stack([encoding.decode(*qsc) for qsc in codes]))
                for i, (q, s, c) in enumerate(codes):
                    host.codes[i, :rows].copy_(q, non_blocking=self.cuda)
                    host.row[i, :rows].copy_(s, non_blocking=self.cuda)
                    host.col[i].copy_(c, non_blocking=self.cuda)
            else:
                sums, sq = device_row_sums(part)
            for i in range(acts.shape[0]):  # contiguous per layer, also for a short last shard
                if not self.encoded:
                    host.acts[i, :rows].copy_(part[i], non_blocking=self.cuda)
                host.sq[i, :rows].copy_(sq[i], non_blocking=self.cuda)
            host.sums.copy_(sums, non_blocking=self.cuda)
            event: Event = _Done()
            if self.cuda:
                event = cuda_event = torch.cuda.Event(blocking=True)  # waiters sleep instead of spinning a core
                cuda_event.record(self.stream)
        if self.cuda:
            # The block was allocated on the producer's stream and is read on ours: the allocator must
            # not give its memory to anyone else before our copy ends, even if the pool drops it.
            assert self.stream is not None
            acts.record_stream(self.stream)
        pool.give(acts, event)
        return Staged(host, rows, event)

    def give(self, host: HostShard, event: Event) -> None:
        """Return a staged host shard once read (its copy must be complete: `event` is waited for)."""
        event.synchronize()
        self.pinned.give(host)
