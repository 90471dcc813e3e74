"""Run a window's batches through the model and hand its shuffled rows to the cache writer.

Rows are selected on the model's device (index_select by precomputed flat indices, so no
host-device synchronisation is needed to learn how many rows a batch keeps), scattered straight
into a per-layer window buffer in the shuffled order, cast to the stored dtype there.

On CUDA the window buffer is copied to pinned host memory (a small pool of reused slabs) on a side
stream, and a hand-off thread waits for that copy and calls `writer.append`, while the main thread
already launches the next window's forward: the GPU never waits for the copy, the writer's cast or
the disk (the writer's own background thread writes shards). `writer.append` must copy what it is
given (CacheWriter does), since the slab is reused once it returns. On CPU the same code appends
directly.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import torch

from cache import CacheWriter
from harvest.model import LoadedModel, forward_blocks
from harvest.windows import WindowPlan


@dataclass
class _Ready:
    plan: WindowPlan
    offset: int
    acts: dict[int, torch.Tensor]  # host tensors, rows [offset, n) of the window, [n - offset, d] each
    event: torch.cuda.Event | None
    slab: torch.Tensor | None = None  # the pinned buffer behind `acts`, returned to the pool after append


class _PinnedPool:
    """Reusable pinned host slabs [layers, rows, d]: allocating pinned memory (cudaHostAlloc) costs
    far more than the copy into it, so at most a few slabs are ever made (one being filled, one
    queued, one being appended). The writer copies what it is given, so a slab is free again as
    soon as `append` returns."""

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, n_layers: int, rows: int, d: int, dtype: torch.dtype) -> torch.Tensor:
        with self._lock:
            for i, slab in enumerate(self._free):
                if slab.dtype == dtype and slab.shape[0] == n_layers and slab.shape[2] == d and slab.shape[1] >= rows:
                    return self._free.pop(i)
        return torch.empty((n_layers, rows, d), dtype=dtype, pin_memory=True)

    def give(self, slab: torch.Tensor) -> None:
        with self._lock:
            self._free.append(slab)


def compute_window(lm: LoadedModel, layers: list[int], plan: WindowPlan,
                   store_dtype: torch.dtype) -> dict[int, torch.Tensor]:
    """Forward every batch of `plan`; returns {layer: [plan.rows, d_model]} in the shuffled row
    order, in `store_dtype`, on the device where that block ran."""
    bufs: dict[int, torch.Tensor] = {}
    non_blocking = lm.device.type == "cuda"
    n = plan.rows

    for batch in plan.batches:
        src = _to(batch.src, lm.device, non_blocking)
        dest = _to(batch.dest, lm.device, non_blocking)

        def on_output(layer: int, hidden: torch.Tensor, src: torch.Tensor = src, dest: torch.Tensor = dest) -> None:
            flat = hidden.reshape(-1, hidden.shape[-1])
            if layer not in bufs:
                bufs[layer] = torch.empty((n, flat.shape[-1]), dtype=store_dtype, device=flat.device)
            s, d = (src, dest) if flat.device == src.device else (src.to(flat.device), dest.to(flat.device))
            bufs[layer].index_copy_(0, d, flat.index_select(0, s).to(store_dtype))

        forward_blocks(lm, layers, on_output, _to(batch.input_ids, lm.device, non_blocking),
                       _to(batch.attention_mask, lm.device, non_blocking))
    if not plan.batches:
        return {layer: torch.empty((0, lm.d_model), dtype=store_dtype) for layer in layers}
    return bufs


def _to(t: torch.Tensor, device: torch.device, non_blocking: bool) -> torch.Tensor:
    if device.type == "cpu":
        return t
    if non_blocking:
        t = t.pin_memory()
    return t.to(device, non_blocking=non_blocking)


class WindowSink:
    """Delivers computed windows to `writer.append`, overlapped with compute on CUDA.

    submit() takes a window's device buffers; rows before `offset` (already committed before a
    resume) are dropped. close() waits for everything submitted; errors surface on the next call.
    """

    def __init__(self, writer: CacheWriter, device: torch.device) -> None:
        self.writer = writer
        self.cuda = device.type == "cuda"
        self._error: BaseException | None = None
        self._queue: queue.Queue[_Ready | None] | None = None
        self._thread: threading.Thread | None = None
        if self.cuda:
            self._pool = _PinnedPool()
            self._stream = torch.cuda.Stream(device=device)
            self._queue = queue.Queue(maxsize=1)
            self._thread = threading.Thread(target=self._worker, name="harvest-handoff", daemon=True)
            self._thread.start()

    def submit(self, plan: WindowPlan, acts: dict[int, torch.Tensor], offset: int) -> None:
        self._raise_if_failed()
        if offset >= plan.rows:
            return
        if not self.cuda:
            self._append(_Ready(plan, offset, {layer: a[offset:] for layer, a in acts.items()}, None))
            return
        host = {}
        rows = plan.rows - offset
        first = next(iter(acts.values()))
        slab = self._pool.take(len(acts), rows, first.shape[1], first.dtype)
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            for i, (layer, buf) in enumerate(acts.items()):
                part = buf[offset:]
                if part.device == self._stream.device:
                    host[layer] = slab[i, :rows]
                    host[layer].copy_(part, non_blocking=True)
                    buf.record_stream(self._stream)  # the allocator must not reuse it before the copy ends
                else:  # a block on another device (device_map): a plain synchronous copy
                    host[layer] = part.to("cpu")
            event = torch.cuda.Event()
            event.record(self._stream)
        assert self._queue is not None  # CUDA path
        self._queue.put(_Ready(plan, offset, host, event, slab))

    def _append(self, ready: _Ready) -> None:
        p, o = ready.plan, ready.offset  # ready.acts already start at row o
        self.writer.append(p.split, chunk=p.chunk, offset=o, acts=ready.acts, token_ids=p.token_ids[o:],
                           sequence=p.sequence[o:], position=p.position[o:], document=p.document[o:])

    def _worker(self) -> None:
        assert self._queue is not None  # the thread exists only on CUDA
        while True:
            ready = self._queue.get()
            try:
                if ready is None:
                    return
                if self._error is None:
                    if ready.event is not None:
                        ready.event.synchronize()
                    self._append(ready)
            except BaseException as exc:  # re-raised in the producer on its next call
                self._error = exc
            finally:
                if ready is not None and ready.slab is not None:
                    if ready.event is not None:  # never recycle a slab a copy may still be writing
                        ready.event.synchronize()
                    self._pool.give(ready.slab)
                self._queue.task_done()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Wait until every submitted window reached the writer; re-raise a hand-off error."""
        if self._thread is not None and self._queue is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self._raise_if_failed()
