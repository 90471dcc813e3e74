"""Shard assembly for one split: appended rows are copied once, straight into a preallocated shard.

`copy_` casts to the stored dtype and moves from any device in the same pass, so every row is copied
exactly once between the producer's tensors and the bytes handed to the shard writer.
"""

from __future__ import annotations

import queue

import numpy as np
import torch

# Spare shard buffers kept for reuse: fresh ones cost a page fault per 4 KiB on first write.
_SPARE_BUFFERS = 4


def _copy_rows(dst: torch.Tensor, src: torch.Tensor) -> None:
    if src.device.type == "cpu" and src.dtype == dst.dtype and src.is_contiguous():
        # A plain byte copy in numpy: torch would split it over its intra-op threads, which on a
        # busy machine costs far more in waiting than the copy itself.
        np.copyto(dst.view(torch.uint8).numpy(), src.view(torch.uint8).numpy())
    else:
        dst.copy_(src)  # casts and moves between devices in the same pass


class ShardAssembler:
    """Fills shard-sized tensors row range by row range and remembers the cursor of the last row."""

    def __init__(self, shard_rows: int, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> None:
        self.shard_rows = shard_rows
        self.specs = specs  # name -> (dtype, shape of one row)
        self.rows = 0
        self.end = (0, 0)
        self._bufs: dict[str, torch.Tensor] | None = None
        self._spare: queue.SimpleQueue[dict[str, torch.Tensor]] = queue.SimpleQueue()

    def _alloc(self) -> dict[str, torch.Tensor]:
        try:
            return self._spare.get_nowait()
        except queue.Empty:
            return {n: torch.empty((self.shard_rows, *shape), dtype=dt) for n, (dt, shape) in self.specs.items()}

    def release(self, buffers: dict[str, torch.Tensor]) -> None:
        """Hand back pop()'s `buffers` once the shard is on disk (from any thread) for reuse."""
        if self._spare.qsize() < _SPARE_BUFFERS:
            self._spare.put(buffers)

    def add(self, chunk: int, offset: int, src: dict[str, torch.Tensor], start: int) -> int:
        """Copy rows src[start:] (as many as fit) into the shard; return how many were taken.

        The rows are rows [offset + start, ...) of producer chunk `chunk`.
        """
        n = next(iter(src.values())).shape[0]
        take = min(n - start, self.shard_rows - self.rows)
        if take <= 0:
            return 0
        if self._bufs is None:
            self._bufs = self._alloc()
        for name, buf in self._bufs.items():
            _copy_rows(buf[self.rows:self.rows + take], src[name][start:start + take])
        self.rows += take
        self.end = (chunk, offset + start + take)
        return take

    def full(self) -> bool:
        return self.rows == self.shard_rows

    def pop(self) -> tuple[dict[str, torch.Tensor], tuple[int, int], dict[str, torch.Tensor]]:
        """(the buffered rows: leading slices of the shard tensors, the cursor after the last row,
        the whole buffers to release() later). A new shard starts empty."""
        assert self._bufs is not None and self.rows > 0
        bufs = self._bufs
        out = {n: b[:self.rows] for n, b in bufs.items()}
        self._bufs, self.rows = None, 0
        return out, self.end, bufs
