"""Shard assembly for one split: appended rows are copied once, straight into a preallocated shard.

A shard's activations are one [layers, shard_rows, d_model] block in the stored dtype, allocated on
the device the producer's rows come from (so that a GPU harvest assembles, and computes statistics,
on the GPU); its token fields are host tensors. `copy_` casts and moves between devices in the same
pass, so every row is copied exactly once between the producer's tensors and the shard buffer.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

import numpy as np
import torch

T = TypeVar("T")


def _copy_rows(dst: torch.Tensor, src: torch.Tensor) -> None:
    if src.device.type == "cpu" and dst.device.type == "cpu" and src.dtype == dst.dtype and src.is_contiguous():
        # A plain byte copy in numpy: torch would split it over its intra-op threads, which on a
        # busy machine costs far more in waiting than the copy itself.
        np.copyto(dst.view(torch.uint8).numpy(), src.view(torch.uint8).numpy())
    else:
        dst.copy_(src)  # casts and moves between devices in the same pass (queued, on CUDA)


class Pool(Generic[T]):
    """Reusable buffers made by `make` (fresh ones cost a page fault per 4 KiB, or a cudaHostAlloc).

    give(item, event): an item still read by queued GPU work comes back with the CUDA event that marks
    the end of that work; it is handed out again only once the event has completed. With `cap`, at
    most that many items exist: take() then waits for the oldest pending one instead of making more.
    Thread-safe."""

    def __init__(self, make: Callable[[], T], keep: int, cap: int | None = None) -> None:
        self._make, self._keep, self._cap = make, keep, cap
        self._free: list[T] = []
        self._pending: deque[tuple[T, object]] = deque()
        self._made = 0
        self._lock = threading.Lock()

    def _reclaim(self) -> None:
        while self._pending and self._pending[0][1].query():
            self._free.append(self._pending.popleft()[0])

    def take(self) -> T:
        with self._lock:
            self._reclaim()
            if self._free:
                return self._free.pop()
            if self._cap is None or self._made < self._cap or not self._pending:
                self._made += 1
                return self._make()
            item, event = self._pending.popleft()
        event.synchronize()  # outside the lock: the GPU work that reads `item` ends soon
        return item

    def give(self, item: T, event: object | None = None) -> None:
        with self._lock:
            if event is not None:
                self._pending.append((item, event))
            elif len(self._free) < self._keep:
                self._free.append(item)
            else:
                self._made -= 1  # dropped: the garbage collector frees it


class Buffers:
    """Buffer pools shared by both splits of one writer: activation blocks per device, token fields."""

    def __init__(self, shard_rows: int, n_layers: int, d_model: int, dtype: torch.dtype,
                 token_specs: dict[str, torch.dtype], keep: int) -> None:
        self.shape = (n_layers, shard_rows, d_model)
        self.dtype, self.keep = dtype, keep
        self._acts: dict[torch.device, Pool[torch.Tensor]] = {}
        self.tokens: Pool[dict[str, torch.Tensor]] = Pool(
            lambda: {n: torch.empty(shard_rows, dtype=dt) for n, dt in token_specs.items()}, keep)
        self._lock = threading.Lock()

    def acts(self, device: torch.device) -> Pool[torch.Tensor]:
        """The pool of activation blocks on `device`. On a GPU a block is busy only until its
        device-to-host copy ends, so a few suffice: two splits filling, one or two being copied."""
        with self._lock:
            if device not in self._acts:
                host = device.type == "cpu"
                self._acts[device] = Pool(lambda: torch.empty(self.shape, dtype=self.dtype, device=device),
                                          keep=self.keep if host else 4, cap=None if host else 4)
            return self._acts[device]


class ShardAssembler:
    """Fills one shard's buffers row range by row range and remembers the cursor of the last row."""

    def __init__(self, buffers: Buffers) -> None:
        self.buffers = buffers
        self.shard_rows = buffers.shape[1]
        self.rows = 0
        self.end = (0, 0)
        self._acts: torch.Tensor | None = None
        self._tokens: dict[str, torch.Tensor] | None = None

    def add(self, chunk: int, offset: int, acts: list[torch.Tensor], tokens: dict[str, torch.Tensor],
            start: int) -> int:
        """Copy rows [start:] of `acts` (per layer, in the writer's layer order, each [n, d]) and of
        `tokens` (each [n]), as many as fit, into the shard; return how many were taken.

        The rows are rows [offset + start, ...) of producer chunk `chunk`."""
        n = acts[0].shape[0]
        take = min(n - start, self.shard_rows - self.rows)
        if take <= 0:
            return 0
        if self._acts is None:
            self._acts = self.buffers.acts(acts[0].device).take()
            self._tokens = self.buffers.tokens.take()
        r0, r1 = self.rows, self.rows + take
        for i, src in enumerate(acts):
            _copy_rows(self._acts[i, r0:r1], src[start:start + take])
        for name, buf in self._tokens.items():
            _copy_rows(buf[r0:r1], tokens[name][start:start + take])
        self.rows = r1
        self.end = (chunk, offset + start + take)
        return take

    def full(self) -> bool:
        return self.rows == self.shard_rows

    def pop(self) -> tuple[torch.Tensor, dict[str, torch.Tensor], tuple[int, int]]:
        """(the whole activation block [layers, shard_rows, d], the whole token buffers, the cursor
        after the last row). Their first `rows` rows are the shard; the caller gives both back to
        `buffers` when done with them. A new shard starts empty."""
        assert self._acts is not None and self.rows > 0
        out = (self._acts, self._tokens, self.end)
        self._acts, self._tokens, self.rows = None, None, 0
        return out
