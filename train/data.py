"""Training batches from an activation cache: shuffled, memory-mapped, prefetched on a thread.

How rows are ordered (all of it a pure function of (seed, epoch), so resuming reads nothing twice):
1. Every train shard is cut into contiguous blocks of `block_rows` rows (a shard's last block may be
   short). Reading whole blocks keeps disk access sequential; rows are never gathered one by one.
2. Each epoch permutes all blocks of the split (numpy PCG64 seeded by (seed, epoch)).
3. Consecutive runs of `buffer_rows // block_rows` permuted blocks form a buffer (read in shard
   order, so that neighbouring blocks of a shard are copied together). A buffer's rows are permuted
   (seeded by (seed, epoch, buffer index)); concatenated, the permuted buffers are the epoch's row
   stream.
4. Batch b of an epoch is rows [b*B, (b+1)*B) of that stream; the last batch may be short. A batch
   may straddle two buffers, so batches are full whatever buffer_rows is.

Mixing: a row and one of its sequence-mates share a batch with probability about B/N, as with a
uniform shuffle, plus (block_rows/W)*(B/buffer_rows) when the harvest scattered a sequence over a
window of W rows (both in one block, then one batch): a relative excess of (block_rows/W)*(N/buffer_rows).
On the default cache (W = 256 sequences of 126 rows, N = 1.79M, buffer 65536) that is 5% with
64-row blocks and 22% with 256-row blocks (bench/RESULTS.md), hence the default of 64: reads of
64 rows are still contiguous (96 KiB at d=384 in float32).

Memory: the worker holds the buffer being served and the next one, loaded a few blocks after each
batch so that no batch waits for a whole buffer: about 2 * buffer_rows rows (in the stored dtype)
plus `prefetch` batches, and a block table of O(rows / block_rows) integers (24 bytes per block:
0.7 MB for 1.8M rows). Nothing grows with the cache but that table. The memory-mapped pages read
are the kernel's page cache (RssFile), reclaimable, not the process's own memory.

Threads: the worker copies with numpy (no OpenMP team of its own beside the training step's) in
few, large calls (each hand-over of the GIL costs a context switch that the training thread feels).
"""

from __future__ import annotations

import math
import operator
import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from cache import encoding

_TAG_BLOCKS, _TAG_ROWS = 1, 2  # keep the block and row permutations' seed streams apart
_POLL_S = 0.05  # how often a blocked put/get re-checks the stop flag


@dataclass
class Batch:
    """One training batch and where it sits; `next_position` is where a resume continues."""

    x: torch.Tensor  # [B, d] or [B, L, d]; contiguous, CPU, the loader's dtype (packed: see `columns`)
    epoch: int
    index: int
    next_position: tuple[int, int] = (0, 0)  # (epoch, index + 1), or (epoch + 1, 0) after the last batch
    # An 8-bit cache read with decode=False: x holds packed rows (uint8 [B, (L,) d + 8]) and `columns` the
    # column-scale table they index; `rows_on` decodes them on the training device into `out_dtype`.
    columns: torch.Tensor | None = None
    out_dtype: torch.dtype = torch.float32


def rows_on(batch, device: torch.device, pin: bool = False, tables: dict | None = None) -> torch.Tensor:
    """The rows of `batch` (any loader's) on `device`, in the loader's dtype; pin=True: through pinned memory,
    the copy queued without waiting. Packed 8-bit rows cross to the device as they are (a quarter of float32's
    bytes) and are decoded there (cache.encoding.decode_packed); `tables` keeps the device copy of their
    column-scale table between batches (it is the same tensor for every batch of a loader)."""
    x = batch.x.pin_memory() if pin else batch.x
    x = x.to(device, non_blocking=pin)
    columns = getattr(batch, "columns", None)
    if columns is None:
        return x
    tables = {} if tables is None else tables
    key = (id(columns), device)
    if key not in tables:
        tables.clear()
        tables[key] = (columns, columns.to(device))  # the source is kept so that its id stays its own
    return encoding.decode_packed(x, tables[key][1], batch.out_dtype)


class _Blocks:
    """The static block table of one split: shard, first row in the shard, and length of each block."""

    def __init__(self, cache, split: str, block_rows: int) -> None:
        shards, starts, lengths = [], [], []
        for i, info in enumerate(cache.shards(split)):
            first = np.arange(0, info.rows, block_rows, dtype=np.int64)
            shards.append(np.full(len(first), i, dtype=np.int64))
            starts.append(first)
            lengths.append(np.minimum(block_rows, info.rows - first))
        self.shard = np.concatenate(shards) if shards else np.zeros(0, np.int64)
        self.start = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self.length = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)


class _EpochPlan:
    """Which blocks form each buffer in one epoch, and where each buffer starts in the row stream."""

    def __init__(self, blocks: _Blocks, seed: int, epoch: int, blocks_per_buffer: int) -> None:
        self.seed, self.epoch = seed, epoch
        self.order = np.random.default_rng([_TAG_BLOCKS, seed, epoch]).permutation(len(blocks.length))
        stream_start = np.concatenate([[0], np.cumsum(blocks.length[self.order])])
        self.block_starts = np.arange(0, len(self.order), blocks_per_buffer)  # first block of each buffer
        self.row_starts = np.append(stream_start[self.block_starts], stream_start[-1])  # [n_buffers + 1]
        self.blocks_per_buffer = blocks_per_buffer

    @property
    def n_buffers(self) -> int:
        return len(self.block_starts)

    def buffer_at(self, row: int) -> int:
        """Index of the buffer holding stream row `row`."""
        return int(np.searchsorted(self.row_starts, row, side="right") - 1)


# The worker copies with numpy, which never starts threads: torch ops on this thread would start a
# second OpenMP team beside the training step's and oversubscribe the cores (on a busy 2-core machine
# one 100 MB torch copy took 6 s with 2 threads, 0.2 s with 1). bfloat16 travels as its raw 16 bits
# (numpy has no bfloat16).
_NP_STORAGE = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def _to_torch(x: np.ndarray, stored: torch.dtype, out: torch.dtype) -> torch.Tensor:
    """Gathered rows in the stored dtype's numpy form -> a tensor of dtype `out` (exact widening)."""
    if stored == torch.bfloat16:
        if out == torch.float32:  # a bfloat16 is the top half of a float32
            wide = x.astype(np.uint32)
            wide <<= 16
            return torch.from_numpy(wide.view(np.float32))
        t = torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    elif out == torch.float32:
        return torch.from_numpy(x.astype(np.float32, copy=False))
    else:
        t = torch.from_numpy(x)
    return t if t.dtype == out else t.to(out)


class _Source:
    """Copies runs of blocks of one shard, every layer the loader reads, into a buffer.

    Each hand-over of the GIL between this thread and the training thread costs a context switch,
    so the copies are few and large. For safetensors, reading a whole shard gives a zero-copy view
    of its memory map: the views of the last few shards are kept, and a run of blocks is one numpy
    `take` per layer. Other backends copy what they read, so they are asked for each block.
    """

    KEEP_SHARDS = 32

    def __init__(self, loader: ActivationLoader) -> None:
        self._loader, self._cache, self._split, self._layers = loader, loader.cache, loader.split, loader.layers
        self._stacked = loader.stacked
        self._packed = loader.packed
        self._views: OrderedDict[int, list] | None = \
            OrderedDict() if loader.cache.backend == "safetensors" else None

    def fill(self, dest: np.ndarray, shard: int, starts: np.ndarray, lengths: np.ndarray) -> None:
        """dest [sum(lengths), d] or [.., L, d] <- rows [starts[i], starts[i] + lengths[i]) of `shard`, in order."""
        if getattr(self._cache, "encoded", False):  # an 8-bit cache: codes and row scales read from disk
            self._loader.bytes_read += dest.shape[0] * len(self._layers) * (self._cache.d_model + 4)
        else:
            self._loader.bytes_read += dest.nbytes  # the stored bytes of these rows and layers
        if self._views is None and self._packed:
            offset = 0
            for lo, n in zip(starts.tolist(), lengths.tolist(), strict=True):
                for j, layer in enumerate(self._layers):
                    q, s, _ = (t.numpy() for t in self._cache.read_encoded(self._split, shard, layer, lo, lo + n))
                    encoding.pack_into(dest[offset:offset + n, j] if self._stacked else dest[offset:offset + n],
                                       q, s, shard)
                offset += n
            return
        if self._views is None:
            offset = 0
            for lo, n in zip(starts.tolist(), lengths.tolist(), strict=True):
                for j, layer in enumerate(self._layers):
                    src = _as_numpy(self._cache.read(self._split, shard, layer, lo, lo + n))
                    np.copyto(dest[offset:offset + n, j] if self._stacked else dest[offset:offset + n], src)
                offset += n
            return
        # Row numbers of the run: each block's start, repeated, plus the position within the block.
        first = np.cumsum(lengths) - lengths
        rows = np.repeat(starts - first, lengths) + np.arange(int(lengths.sum()))
        for j, view in enumerate(self._shard_views(shard)):
            if isinstance(view, tuple) and self._packed:  # 8-bit rows, decoded on the training device
                encoding.pack_into(dest[:, j] if self._stacked else dest, np.take(view[0], rows, axis=0),
                                   view[1][rows], shard)
            elif isinstance(view, tuple):  # an 8-bit cache: decode the taken codes into the float32 buffer
                q, s, c = view
                encoding.decode_numpy(np.take(q, rows, axis=0), s[rows], c,
                                      out=dest[:, j] if self._stacked else dest)
            elif self._stacked:  # take() into a strided destination is slow; copy through a temporary
                np.copyto(dest[:, j], np.take(view, rows, axis=0))
            else:
                np.take(view, rows, axis=0, out=dest, mode="clip")  # rows are in range by construction

    def _shard_views(self, shard: int) -> list:
        """Per layer, the shard's rows (np.ndarray), or for an 8-bit cache its (codes, row scales, column
        scales): zero-copy views of the memory map either way."""
        cached = self._views
        assert cached is not None  # only the safetensors path keeps views
        views = cached.pop(shard, None)
        if views is None:
            if getattr(self._cache, "encoded", False):
                views = [tuple(t.numpy() for t in self._cache.read_encoded(self._split, shard, layer))
                         for layer in self._layers]
            else:
                views = [_as_numpy(self._cache.read(self._split, shard, layer)) for layer in self._layers]
        cached[shard] = views
        if len(cached) > self.KEEP_SHARDS:
            cached.popitem(last=False)
        return views


class _Buffer:
    """One buffer: its blocks, read on demand into `storage`, and its row permutation."""

    def __init__(self, loader: ActivationLoader, plan: _EpochPlan, index: int, storage: np.ndarray,
                 source: _Source) -> None:
        self.epoch, self.index, self._source = plan.epoch, index, source
        self.row_start, self.row_end = int(plan.row_starts[index]), int(plan.row_starts[index + 1])
        first = plan.block_starts[index]
        # In block-id order, i.e. shard by shard: runs of one shard are read together, forwards.
        self._blocks = np.sort(plan.order[first:first + plan.blocks_per_buffer])
        self._loader, self._next_block, self._filled = loader, 0, 0
        rows = self.row_end - self.row_start
        self.storage = storage  # reused from buffer to buffer: no page faults on fresh memory
        self.data = storage[:rows]  # [rows, d] or [rows, L, d]
        self.perm = np.random.default_rng([_TAG_ROWS, plan.seed, plan.epoch, index]).permutation(rows)

    @property
    def blocks_left(self) -> int:
        return len(self._blocks) - self._next_block

    def load(self, n_blocks: int | None = None) -> None:
        """Read the next `n_blocks` blocks (all remaining ones by default) into `data`."""
        stop = len(self._blocks) if n_blocks is None else min(len(self._blocks), self._next_block + n_blocks)
        table, chosen = self._loader._blocks, self._blocks[self._next_block:stop]
        shards, starts, lengths = table.shard[chosen], table.start[chosen], table.length[chosen]
        for run in np.split(np.arange(len(chosen)), np.flatnonzero(np.diff(shards)) + 1):
            if len(run):
                n = int(lengths[run].sum())
                dest = self.data[self._filled:self._filled + n]
                self._source.fill(dest, int(shards[run[0]]), starts[run], lengths[run])
                self._filled += n
        self._next_block = stop

    def take(self, lo: int, hi: int) -> np.ndarray:
        """Rows lo..hi of this buffer's permuted order (buffer-local positions) -> [hi-lo, ...], a copy."""
        return np.take(self.data, self.perm[lo:hi], axis=0)


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class ActivationLoader:
    """Shuffled batches of one layer ([B, d]) or of several layers of the same rows ([B, L, d]).

    `batches(epoch, batch)` is an endless iterator over epochs that starts at that position and
    yields exactly what an uninterrupted iteration yields from there. A background thread reads
    and assembles batches; its errors are raised in the consumer. Call `close()` (or use `with`)
    to stop it; breaking out of the iteration stops it too.
    """

    def __init__(self, cache, layers: int | list[int], batch_size: int, *, seed: int = 0,
                 block_rows: int = 64, buffer_rows: int = 65536, prefetch: int = 2,
                 dtype: torch.dtype = torch.float32, split: str = "train", decode: bool = True) -> None:
        for name, value, low in (("batch_size", batch_size, 1), ("block_rows", block_rows, 1),
                                 ("buffer_rows", buffer_rows, 1), ("prefetch", prefetch, 1), ("seed", seed, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"ActivationLoader: {name} must be an int >= {low}, got {value!r}")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"ActivationLoader: dtype must be a floating torch.dtype, got {dtype!r}")
        if split not in cache.splits:
            raise ValueError(f"ActivationLoader: unknown split {split!r}; the cache has {list(cache.splits)}")
        self.cache, self.split, self.dtype, self.seed = cache, split, dtype, seed
        self.stacked = not isinstance(layers, int)
        self.layers = self._check_layers(cache, [layers] if isinstance(layers, int) else list(layers))
        # decode=False on an 8-bit cache: batches of packed rows, decoded by the consumer on its device (rows_on).
        self.packed = bool(getattr(cache, "encoded", False)) and not decode
        width = cache.d_model + (encoding.PACKED_EXTRA if self.packed else 0)
        self._row_shape = (len(self.layers), width) if self.stacked else (width,)
        self.columns = self._column_table(cache, split, self.layers, self.stacked) if self.packed else None
        self.batch_size, self.block_rows, self.buffer_rows = batch_size, block_rows, buffer_rows
        self.prefetch = prefetch
        self._blocks = _Blocks(cache, split, block_rows)
        self.rows_per_epoch = int(self._blocks.length.sum())
        if self.rows_per_epoch == 0:
            raise ValueError(f"ActivationLoader: split {split!r} of the cache at {cache.path} has no rows; "
                             "harvest more tokens")
        self.batches_per_epoch = math.ceil(self.rows_per_epoch / batch_size)
        self._blocks_per_buffer = max(1, buffer_rows // block_rows)
        self._workers: set[_Worker] = set()
        self._closed = False
        self.bytes_read = 0  # bytes of cache rows read for batches so far (all iterations); the worker adds

    @staticmethod
    def _column_table(cache, split: str, layers: list[int], stacked: bool) -> torch.Tensor:
        """[shards, (L,) d] float32: every shard's column scales, read from the shards' headers (the rows
        that use them are read, and verified, through the cache as usual)."""
        from cache import shardio

        table = []
        for info in cache.shards(split):
            reader = shardio.open_shard(cache.path / info.name, cache.backend)
            table.append(torch.stack([reader.get(encoding.col_scale_key(L)).clone() for L in layers]))
        out = torch.stack(table) if table else torch.zeros((0, len(layers), cache.d_model))
        return out if stacked else out[:, 0]

    @staticmethod
    def _check_layers(cache, layers: list) -> list[int]:
        if not layers:
            raise ValueError("ActivationLoader: layers is empty; name at least one block")
        for layer in layers:
            if not isinstance(layer, int) or isinstance(layer, bool) or layer not in cache.layers:
                raise ValueError(f"ActivationLoader: layer {layer!r} is not in the cache at {cache.path}; "
                                 f"it holds layers {list(cache.layers)}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"ActivationLoader: layers {layers} name a layer twice")
        return layers

    def plan(self, epoch: int) -> _EpochPlan:
        """Which blocks form which buffer in `epoch`: a pure function of (seed, epoch), no reads."""
        return _EpochPlan(self._blocks, self.seed, epoch, self._blocks_per_buffer)

    def batches(self, epoch: int = 0, batch: int = 0) -> Iterator[Batch]:
        """Endless batches from position (epoch, batch). x: [B, d] (one layer) or [B, L, d]."""
        if self._closed:
            raise RuntimeError("ActivationLoader: batches() after close(); make a new loader")
        try:  # positions may come back from a checkpoint as numpy or torch integers
            epoch, batch = operator.index(epoch), operator.index(batch)
        except TypeError:
            raise ValueError(f"ActivationLoader: position ({epoch!r}, {batch!r}) must be two ints") from None
        if batch == self.batches_per_epoch:  # a saved "next position" past the last batch
            epoch, batch = epoch + 1, 0
        if not (epoch >= 0 and 0 <= batch < self.batches_per_epoch):
            raise ValueError(f"ActivationLoader: position ({epoch!r}, {batch!r}) is out of range; an epoch has "
                             f"batches 0..{self.batches_per_epoch - 1} and epochs start at 0")
        return self._iterate(_Worker(self, epoch, batch))

    def _iterate(self, worker: _Worker) -> Iterator[Batch]:
        self._workers.add(worker)
        worker.start()
        try:
            while True:
                item = worker.get()
                if item is None:  # stopped by close()
                    return
                yield item
        finally:
            worker.stop()
            self._workers.discard(worker)

    def close(self) -> None:
        """Stop every background thread (waits for them); later batches() calls are refused."""
        self._closed = True
        for worker in list(self._workers):
            worker.stop()
        self._workers.clear()

    def __enter__(self) -> ActivationLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"ActivationLoader({self.split}, layers={self.layers if self.stacked else self.layers[0]}, "
                f"rows={self.rows_per_epoch}, batch={self.batch_size}, batches/epoch={self.batches_per_epoch})")


class _Worker:
    """The background thread of one `batches()` iteration, and its bounded queue."""

    def __init__(self, loader: ActivationLoader, epoch: int, batch: int) -> None:
        self._loader, self._epoch, self._batch = loader, epoch, batch
        self._queue: queue.Queue = queue.Queue(maxsize=loader.prefetch)
        self._stop = threading.Event()
        self._plans: dict[int, _EpochPlan] = {}
        self._spare: list[np.ndarray] = []  # storage of drained buffers
        self._source = _Source(loader)
        self.thread = threading.Thread(target=self._run, name="ActivationLoader", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join()

    def get(self) -> Batch | None:
        """The next batch; None once stopped; re-raises the thread's error."""
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if isinstance(item, _Failure):
                self._stop.set()
                raise item.exc
            return item
        return None

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the consumer
            exc.add_note("(raised in the ActivationLoader's background thread)")
            self._put(_Failure(exc))

    def _serve(self) -> None:
        B, N = self._loader.batch_size, self._loader.rows_per_epoch
        pos = self._batch * B  # row of the epoch's stream where the next batch starts
        plan = self._plan(self._epoch)
        cur, nxt = self._buffer(plan, plan.buffer_at(pos)), None
        cur.load()
        while not self._stop.is_set():
            epoch, hi = cur.epoch, min(pos + B, N)
            pieces = [cur.take(pos - cur.row_start, min(hi, cur.row_end) - cur.row_start)]
            while hi > cur.row_end:  # the batch goes on in the next buffer (same epoch: hi <= N)
                cur, nxt = self._advance(cur, nxt)
                pieces.append(cur.take(0, min(hi, cur.row_end) - cur.row_start))
            rows = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
            index = pos // B
            nxt_pos = (epoch + 1, 0) if hi == N else (epoch, index + 1)
            ld = self._loader
            if ld.packed:
                batch = Batch(torch.from_numpy(rows), epoch, index, nxt_pos, ld.columns, ld.dtype)
            else:
                batch = Batch(_to_torch(rows, ld.cache.dtype, ld.dtype), epoch, index, nxt_pos)
            if not self._put(batch):
                return
            if hi == cur.row_end:  # drained (always so at the end of an epoch)
                cur, nxt = self._advance(cur, nxt)
                pos = cur.row_start
            else:
                pos = hi
                nxt = nxt or self._following(cur)
                nxt.load(self._quota(cur, nxt, pos))

    def _plan(self, epoch: int) -> _EpochPlan:
        if epoch not in self._plans:
            self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}
            self._plans[epoch] = self._loader.plan(epoch)
        return self._plans[epoch]

    def _following(self, buf: _Buffer) -> _Buffer:
        """The buffer served after `buf`: the next one of its epoch, or the first of the next epoch."""
        plan = self._plan(buf.epoch)
        if buf.index + 1 < plan.n_buffers:
            return self._buffer(plan, buf.index + 1)
        return self._buffer(self._plan(buf.epoch + 1), 0)

    def _buffer(self, plan: _EpochPlan, index: int) -> _Buffer:
        ld = self._loader
        kind = np.uint8 if ld.packed else _NP_STORAGE[ld.cache.dtype]
        storage = self._spare.pop() if self._spare else \
            np.empty((plan.blocks_per_buffer * ld.block_rows, *ld._row_shape), dtype=kind)
        return _Buffer(ld, plan, index, storage, self._source)

    def _advance(self, cur: _Buffer, nxt: _Buffer | None) -> tuple[_Buffer, None]:
        """Make the next buffer current (finishing its reads); `cur`'s storage is reused."""
        nxt = nxt or self._following(cur)
        nxt.load()
        self._spare.append(cur.storage)
        return nxt, None

    def _quota(self, cur: _Buffer, nxt: _Buffer, pos: int) -> int:
        # Spread the next buffer's reads over the batches left in this one, so it is ready in time.
        batches_left = max(1, math.ceil((cur.row_end - pos) / self._loader.batch_size))
        return math.ceil(nxt.blocks_left / batches_left)
