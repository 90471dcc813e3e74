"""CacheWriter: buffers rows, writes shards (optionally from a background thread), keeps the manifest.

Order of operations per shard: statistics, temp file, fsync, rename, fsync folder, then the
manifest rewrite that makes the shard part of the cache. A failure at any step leaves the manifest
describing the shards before it; the writer then refuses further work so that no later shard can be
committed after a missing one.
"""

from __future__ import annotations

import copy
import operator
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from durable import describe_os_error

from . import folder as folder_mod
from . import manifest, shardio
from .buffer import ShardAssembler
from .names import (
    BACKENDS,
    SPLITS,
    STORED_DTYPES,
    TOKEN_FIELDS,
    check_compression,
    layer_key,
    shard_name,
    stat_keys,
)
from .stats import shard_sums

_QUEUE_DEPTH = 2


@dataclass
class _Job:
    split: str
    index: int
    tensors: dict[str, torch.Tensor]
    end: tuple[int, int]
    buffers: dict[str, torch.Tensor]


def _check_int(name: str, value: Any) -> int:
    try:
        index = operator.index(value) if not isinstance(value, bool) else -1
    except TypeError:
        index = -1
    if index < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return index


class CacheWriter:
    """Writes a cache folder. FORMAT.md section 6 states the new / resume / overwrite / refuse rules.

    async_write=True writes shards from a background thread behind a queue of depth 2, so the
    producer waits for the disk only when two shards are already pending; an error in that thread
    is raised by the producer's next append / flush / finish.
    """

    def __init__(self, path: str | Path, *, layers: list[int], d_model: int, dtype: str, shard_rows: int,
                 identity: dict, metadata: dict, backend: str = "safetensors", overwrite: bool = False,
                 zarr_compression: str | None = None, async_write: bool = False) -> None:
        self._check_args(layers, d_model, dtype, shard_rows, backend, zarr_compression, identity, metadata)
        self.path = Path(path)
        self.layers = [int(x) for x in layers]
        self.d_model, self.dtype, self.backend = d_model, dtype, backend
        self.shard_rows, self.zarr_compression = shard_rows, zarr_compression
        self._stored = STORED_DTYPES[dtype]
        requested = manifest.new(
            identity=folder_mod.json_roundtrip(identity, "identity"),
            metadata=folder_mod.json_roundtrip(metadata, "metadata"), layers=self.layers,
            d_model=d_model, dtype=dtype, backend=backend, shard_rows=shard_rows,
            zarr_compression=zarr_compression)
        self._manifest, self._totals = folder_mod.open_for_writing(self.path, requested, overwrite)
        self._lock = threading.Lock()
        specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
            layer_key(L): (self._stored, (d_model,)) for L in self.layers}
        specs.update({name: (dt, ()) for name, dt in TOKEN_FIELDS.items()})
        self._asm = {s: ShardAssembler(shard_rows, specs) for s in SPLITS}
        self._next_index = {s: len(self._manifest["shards"][s]) for s in SPLITS}
        self._cursor = {s: self.resume_point(s) for s in SPLITS}
        self._appended = {s: self._manifest["rows"][s] for s in SPLITS}
        self._error: BaseException | None = None
        workers = max(1, min(len(self.layers), (os.cpu_count() or 1) // 2))
        self._stats_pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cache-stats")
        self._closed = False
        self._queue: queue.Queue[_Job | None] | None = None
        self._thread: threading.Thread | None = None
        if async_write:
            self._queue = queue.Queue(maxsize=_QUEUE_DEPTH)
            self._thread = threading.Thread(target=self._worker, name="cache-writer", daemon=True)
            self._thread.start()

    @staticmethod
    def _check_args(layers: list[int], d_model: int, dtype: str, shard_rows: int, backend: str,
                    zarr_compression: str | None, identity: object, metadata: object) -> None:
        if not layers or len(set(layers)) != len(layers) or not all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layers):
            raise ValueError(f"layers must be a non-empty list of distinct block numbers >= 0, got {layers!r}")
        if not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        if dtype not in STORED_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(STORED_DTYPES)}, got {dtype!r}")
        if not isinstance(shard_rows, int) or shard_rows < 1:
            raise ValueError(f"shard_rows must be a positive int, got {shard_rows!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
        check_compression(zarr_compression)
        if not isinstance(identity, dict) or not isinstance(metadata, dict):
            raise ValueError("identity and metadata must be dicts (JSON objects)")
        if zarr_compression is not None and backend != "zarr":
            raise ValueError("zarr_compression applies only to backend='zarr'")

    # ---- queries -------------------------------------------------------------------------------
    def _split(self, split: str) -> str:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        return split

    def resume_point(self, split: str) -> tuple[int, int]:
        """(chunk, offset) after the last committed row of `split`; (0, 0) when none is committed."""
        with self._lock:
            shards = self._manifest["shards"][self._split(split)]
            return tuple(shards[-1]["end"]) if shards else (0, 0)

    def rows_written(self, split: str) -> int:
        """Rows of `split` committed to disk and listed in the manifest."""
        with self._lock:
            return self._manifest["rows"][self._split(split)]

    def rows_appended(self, split: str) -> int:
        """Rows of `split` committed, being written, or buffered (what a token budget should count)."""
        return self._appended[self._split(split)]

    # ---- appending ----------------------------------------------------------------------------
    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise RuntimeError(f"CacheWriter for {self.path} is closed")

    def _validate(self, acts: dict[int, torch.Tensor], tokens: dict[str, torch.Tensor]) -> dict:
        """The appended tensors by stored name, checked; not yet copied."""
        merged: dict[Any, Any] = {**acts, **tokens} if isinstance(acts, dict) else {}
        bad = [k for k, v in merged.items() if not isinstance(v, torch.Tensor)] \
            if isinstance(acts, dict) else []
        if bad:
            raise ValueError(f"append() needs torch tensors; not a tensor: {bad}")
        if not isinstance(acts, dict) or set(acts) != set(self.layers):
            got = sorted(acts) if isinstance(acts, dict) else type(acts).__name__
            raise ValueError(f"acts must map exactly the cache's layers {self.layers} to tensors, got {got}")
        n = acts[self.layers[0]].shape[0] if acts[self.layers[0]].ndim else -1
        out = {}
        for layer in self.layers:
            a = acts[layer]
            if a.shape != (n, self.d_model) or not a.is_floating_point():
                raise ValueError(f"acts[{layer}] must be a float tensor [n, {self.d_model}] with the same n "
                                 f"for every layer, got {a.dtype} {tuple(a.shape)}")
            out[layer_key(layer)] = a.detach()
        for name, dtype in TOKEN_FIELDS.items():
            t = tokens[name]
            if t.shape != (n,) or t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
                raise ValueError(f"{name} must be an integer tensor [{n}], got {t.dtype} {tuple(t.shape)}")
            info = torch.iinfo(dtype)
            if n and (int(t.min()) < 0 or int(t.max()) > info.max):
                raise ValueError(f"{name} values must lie in [0, {info.max}] to be stored as {dtype}")
            out[name] = t.detach()
        return out

    def append(self, split: str, *, chunk: int, offset: int, acts: dict[int, torch.Tensor],
               token_ids: torch.Tensor, sequence: torch.Tensor, position: torch.Tensor,
               document: torch.Tensor) -> None:
        """Add rows [offset, offset+n) of producer chunk `chunk` to `split`.

        acts[L]: [n, d_model], any float dtype and device (cast to the stored dtype, copied to CPU).
        token_ids, sequence, position, document: integer [n]. Writes a shard each time shard_rows
        rows are buffered; its `end` cursor is (chunk, offset) of the row after its last row.
        """
        self._raise_if_failed()
        self._split(split)
        chunk, offset = _check_int("chunk", chunk), _check_int("offset", offset)
        if (chunk, offset) < self._cursor[split]:
            raise ValueError(f"append({split!r}, chunk={chunk}, offset={offset}) starts before the end of the "
                             f"rows already appended (chunk, offset) = {self._cursor[split]}; rows would repeat")
        src = self._validate(acts, {"token_ids": token_ids, "sequence": sequence, "position": position,
                                    "document": document})
        n = token_ids.shape[0]
        self._cursor[split] = (chunk, offset + n)
        self._appended[split] += n
        asm, start = self._asm[split], 0
        while start < n:
            start += asm.add(chunk, offset, src, start)
            if asm.full():
                self._emit(split)

    def _emit(self, split: str) -> None:
        tensors, end, buffers = self._asm[split].pop()
        job = _Job(split, self._next_index[split], tensors, end, buffers)
        self._next_index[split] += 1
        if self._queue is None:
            self._run(job)
            self._raise_if_failed()
        else:
            assert self._queue is not None  # async_write
            self._queue.put(job)

    # ---- committing ---------------------------------------------------------------------------
    def _worker(self) -> None:
        assert self._queue is not None  # the thread exists only with async_write
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if self._error is None:
                    self._run(job)
            finally:
                self._queue.task_done()

    def _run(self, job: _Job) -> None:
        try:
            self._commit(job)
            self._asm[job.split].release(job.buffers)
        except BaseException as exc:  # surfaced to the producer on its next call
            self._error = exc

    def _commit(self, job: _Job) -> None:
        name = shard_name(job.split, job.index, self.backend)
        rows = job.tensors["token_ids"].shape[0]
        try:
            # Layers are independent and numpy releases the GIL: spread them over spare cores.
            sums = dict(zip(self.layers, self._stats_pool.map(shard_sums, [job.tensors[layer_key(L)]
                                                                           for L in self.layers]), strict=True))
        except ValueError as exc:
            raise ValueError(f"shard {name}: {exc}") from None
        tensors = dict(job.tensors)
        for layer, s in sums.items():
            k_sum, k_sq, k_norm = stat_keys(layer)
            tensors[k_sum] = torch.from_numpy(s.sum)
            tensors[k_sq] = torch.tensor(s.sumsq, dtype=torch.float64)
            tensors[k_norm] = torch.tensor(s.sumnorm, dtype=torch.float64)
        nbytes, digest = shardio.write_shard(self.path, name, tensors, self.backend, self.zarr_compression)
        with self._lock:
            m = self._manifest
            m["shards"][job.split].append({"name": name, "rows": rows, "bytes": nbytes, "xxh3": digest,
                                           "end": list(job.end)})
            m["rows"][job.split] += rows
            self._totals[job.split].add(rows, sums)
            m["stats"][job.split] = self._totals[job.split].to_manifest()
            self._save(f"the manifest after shard {name}")

    def _save(self, what: str) -> None:
        try:
            manifest.save(self.path, self._manifest)
        except OSError as exc:
            raise describe_os_error(exc, f"{what} in {self.path}") from exc

    def _drain(self) -> None:
        if self._queue is not None:
            self._queue.join()

    # ---- ending -------------------------------------------------------------------------------
    def flush(self) -> None:
        """Write every buffered row as a (possibly short) shard and wait until it is committed."""
        self._raise_if_failed()
        for split in SPLITS:
            if self._asm[split].rows:
                self._emit(split)
        self._drain()
        self._raise_if_failed()

    def finish(self, extra_metadata: dict | None = None) -> None:
        """flush(), merge extra_metadata into metadata, mark the cache complete, release the writer."""
        self.flush()
        with self._lock:
            if extra_metadata:
                self._manifest["metadata"].update(folder_mod.json_roundtrip(extra_metadata, "extra_metadata"))
            self._manifest["complete"] = True
            self._save("the final manifest")
        self.close()

    def close(self) -> None:
        """Stop without writing buffered rows (error paths). Shards already queued are still committed."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None and self._queue is not None:
            self._queue.put(None)
            self._thread.join()
        self._stats_pool.shutdown()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def manifest(self) -> dict:
        """A snapshot of the manifest as last committed (a deep copy; safe to read)."""
        with self._lock:
            return copy.deepcopy(self._manifest)

