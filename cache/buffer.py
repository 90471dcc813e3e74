"""Shard assembly for one split: each appended row is copied at most once on its way to the shard.

Rows that arrive on a GPU are copied into one [layers, shard_rows, d_model] block on that GPU (so that
the shard's statistics are computed there and it crosses to the host in one copy). Rows that arrive
on the host are kept as *pieces*: the producer's own tensors when it hands them over (`copy=False`,
already in the stored dtype), else copies into a reused host block at the same rows. Token fields are
always copied into reused host buffers (they are small). `copy_` casts and moves between devices in the
same pass.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np
import torch

T = TypeVar("T")


def assembles_on_device(device: torch.device) -> bool:
    """Whether rows arriving on `device` are assembled there (and staged to the host by the writer)."""
    return device.type == "cuda"


def _copy_rows(dst: torch.Tensor, src: torch.Tensor) -> None:
    if src.device.type == "cpu" and dst.device.type == "cpu" and src.dtype == dst.dtype and src.is_contiguous():
        # A plain byte copy in numpy: torch would split it over its intra-op threads, which on a
        # busy machine costs far more in waiting than the copy itself.
        np.copyto(dst.view(torch.uint8).numpy(), src.view(torch.uint8).numpy())
    else:
        dst.copy_(src)  # casts and moves between devices in the same pass (queued, on CUDA)


class Event(Protocol):
    """What a CUDA event offers and the pools wait on (staging's _Done on a CPU)."""

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


class Pool(Generic[T]):
    """Reusable buffers made by `make` (fresh ones cost a page fault per 4 KiB, or a cudaHostAlloc).

    give(item, event): an item still read by queued GPU work comes back with the CUDA event that marks
    the end of that work; it is handed out again only once the event has completed. With `cap`, at
    most that many items exist: take() then waits for the oldest pending one instead of making more.
    Thread-safe."""

    def __init__(self, make: Callable[[], T], keep: int, cap: int | None = None) -> None:
        self._make, self._keep, self._cap = make, keep, cap
        self._free: list[T] = []
        self._pending: deque[tuple[T, Event]] = deque()
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

    def give(self, item: T, event: Event | None = None) -> None:
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


@dataclass
class Pending:
    """A full (or flushed) shard handed over by `ShardAssembler.pop`: its first `rows` rows.

    device: the GPU block [layers, shard_rows, d] (rows on a GPU), or None; host: the pieces of each
    layer (rows on the host); block: the host block some pieces are views of, or None; tokens: the
    whole token buffers. The receiver gives `block` and `tokens` back to the Buffers pools."""

    rows: int
    end: tuple[int, int]
    device: torch.Tensor | None
    host: list[list[torch.Tensor]]
    block: torch.Tensor | None
    tokens: dict[str, torch.Tensor]


class ShardAssembler:
    """Fills one shard row range by row range and remembers the cursor of the last row."""

    def __init__(self, buffers: Buffers) -> None:
        self.buffers = buffers
        self.shard_rows = buffers.shape[1]
        self.rows = 0
        self.end = (0, 0)
        self._start()

    def _start(self) -> None:
        self._device: torch.Tensor | None = None
        self._block: torch.Tensor | None = None
        self._pieces: list[list[torch.Tensor]] = [[] for _ in range(self.buffers.shape[0])]
        self._tokens: dict[str, torch.Tensor] | None = None

    def add(self, chunk: int, offset: int, acts: list[torch.Tensor], tokens: dict[str, torch.Tensor],
            start: int, copy: bool = True) -> int:
        """Take rows [start:] of `acts` (per layer, in the writer's layer order, each [n, d]) and of
        `tokens` (each [n]), as many as fit in the shard; return how many were taken. With copy=False the
        host rows may be kept by reference (the caller must leave them unchanged).

        The rows are rows [offset + start, ...) of producer chunk `chunk`."""
        n = acts[0].shape[0]
        take = min(n - start, self.shard_rows - self.rows)
        if take <= 0:
            return 0
        if self._tokens is None:
            self._tokens = self.buffers.tokens.take()
            if assembles_on_device(acts[0].device):
                self._device = self.buffers.acts(acts[0].device).take()
        r0, r1 = self.rows, self.rows + take
        for i, src in enumerate(acts):
            part = src[start:start + take]
            if self._device is not None:
                _copy_rows(self._device[i, r0:r1], part)
            elif not copy and part.device.type == "cpu" and part.dtype == self.buffers.dtype and part.is_contiguous():
                self._pieces[i].append(part)
            else:
                if self._block is None:
                    self._block = self.buffers.acts(torch.device("cpu")).take()
                _copy_rows(self._block[i, r0:r1], part)
                self._pieces[i].append(self._block[i, r0:r1])
        for name, buf in self._tokens.items():
            _copy_rows(buf[r0:r1], tokens[name][start:start + take])
        self.rows = r1
        self.end = (chunk, offset + start + take)
        return take

    def full(self) -> bool:
        return self.rows == self.shard_rows

    def pop(self) -> Pending:
        """The buffered shard; a new shard starts empty."""
        assert self._tokens is not None and self.rows > 0
        out = Pending(self.rows, self.end, self._device, self._pieces, self._block, self._tokens)
        self.rows = 0
        self._start()
        return out
