"""CacheWriter: buffers rows into shards, writes several shards at once, commits them in order.

Per shard: statistics (on the GPU when the rows came from one, before the device-to-host copy), the
write under a temporary name with the checksum computed on the way out, fsync; then, in shard order,
the rename, one fsync of the folder and one manifest rewrite for every shard that finished together
(cache/pipeline.py). A failure leaves the manifest describing the shards before the failed one; the
writer then refuses further work so that no later shard can be committed after a missing one.
"""

from __future__ import annotations

import copy
import operator
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from durable import describe_os_error
from durable import lock as durable_lock

from . import encoding, manifest, shardio
from . import folder as folder_mod
from .buffer import Buffers, Event, ShardAssembler
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
from .pipeline import Job, Pipeline
from .staging import DeviceStager
from .stats import ShardSums, combine, host_row_sums

# Defaults of `max_inflight`: up to 16 shards while they hold less than GROUP_BYTES, never more than
# INFLIGHT_BYTES of activations (host memory), and at least 2. Of `max_uncommitted`: up to 64 shards
# while they hold less than UNCOMMITTED_BYTES, and at least max_inflight.
GROUP_BYTES = 512 << 20
# Seconds between manifest rewrites of an async writer (cache/pipeline.py): shards that finish within it
# share one rewrite. A crash may lose them, as it may lose any shard not yet listed (FORMAT.md 6).
COMMIT_INTERVAL = 0.5
INFLIGHT_BYTES = 4 << 30
UNCOMMITTED_BYTES = 2 << 30


@dataclass
class _Shard:
    """A shard on its way to disk: host activations (the pieces of each layer; pinned when staged from a
    GPU, then readable once `event` completed), host token fields [rows], and the float64 row sums when
    the GPU computed them."""

    acts: list[list[torch.Tensor]]
    tokens: dict[str, torch.Tensor]
    sums: torch.Tensor | None = None  # [layers, d] float64
    sq: torch.Tensor | None = None  # [layers, rows] float64
    event: Event | None = None
    codes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None  # 8-bit, encoded on the GPU


@dataclass
class _Written:
    nbytes: int
    digest: str
    sums: dict[int, ShardSums]


def _check_int(name: str, value: Any) -> int:
    try:
        index = operator.index(value) if not isinstance(value, bool) else -1
    except TypeError:
        index = -1
    if index < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return index


def default_workers() -> int:
    """Writer threads: enough to keep a disk busy while others hash and compute statistics; half the
    cores this process may use, shared with the other processes of a torchrun job on this node
    (LOCAL_WORLD_SIZE), between 3 and 4: a worker waiting for fsync leaves its core to another."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return min(4, max(3, cpus // 2 // local))


class CacheWriter:
    """Writes a cache folder. FORMAT.md section 6 states the new / resume / overwrite / refuse rules.

    async_write=True prepares shards on `workers` background threads (default: 3 or 4, by core count),
    with at most `max_inflight` shards filled and not yet written (their buffers; default: workers + 1,
    up to 16 small shards while they hold less than 512 MiB, at most 4 GiB and at least 2 shards) and
    at most `max_uncommitted` filled and not yet listed in the manifest (what a crash can lose; default:
    up to 64 shards while they hold less than 2 GiB, at least max_inflight); the producer waits only
    when either is reached. An error in the background is raised by the producer's next append / flush
    / finish.
    async_write=False writes one shard at a time and returns from the append that filled it only once
    it is committed.

    Rows appended as CUDA tensors are assembled on that GPU, their statistics computed there, and copied
    to reused pinned host buffers on a side stream (cache/staging.py): append never waits for the GPU.
    Memory: host, (max_inflight + 2) shards of activations; GPU, up to 4 shards.
    """

    def __init__(self, path: str | Path, *, layers: list[int], d_model: int, dtype: str, shard_rows: int,
                 identity: dict, metadata: dict, backend: str = "safetensors", overwrite: bool = False,
                 zarr_compression: str | None = None, async_write: bool = False, workers: int | None = None,
                 max_inflight: int | None = None, max_uncommitted: int | None = None, lock: bool = True) -> None:
        self._check_args(layers, d_model, dtype, shard_rows, backend, zarr_compression, identity, metadata)
        workers = default_workers() if workers is None else _check_int("workers", workers)
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        # Rows wait for their shard in the stored dtype, or in float32 for an 8-bit one (encoded per shard).
        self._stored = STORED_DTYPES.get(dtype, encoding.DECODED_DTYPE)
        shard_bytes = len(layers) * shard_rows * d_model * self._stored.itemsize
        if max_inflight is None:
            # Small shards: more of them, so that many share a manifest rewrite; large ones: a memory cap.
            wanted = max(workers + 1, min(16, GROUP_BYTES // shard_bytes))
            max_inflight = max(2, min(wanted, INFLIGHT_BYTES // shard_bytes))
        elif _check_int("max_inflight", max_inflight) < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        if max_uncommitted is None:
            max_uncommitted = max(max_inflight, min(64, UNCOMMITTED_BYTES // shard_bytes))
        elif _check_int("max_uncommitted", max_uncommitted) < max_inflight:
            raise ValueError(f"max_uncommitted must be >= max_inflight ({max_inflight}), got {max_uncommitted}")
        self.path = Path(path)
        self.layers = [int(x) for x in layers]
        self.d_model, self.dtype, self.backend = d_model, dtype, backend
        self.shard_rows, self.zarr_compression = shard_rows, zarr_compression
        requested = manifest.new(
            identity=folder_mod.json_roundtrip(identity, "identity"),
            metadata=folder_mod.json_roundtrip(metadata, "metadata"), layers=self.layers,
            d_model=d_model, dtype=dtype, backend=backend, shard_rows=shard_rows,
            zarr_compression=zarr_compression)
        # One writer per folder (durable.lock): a second one, or a writer against a training reading
        # the cache, is refused here naming the holder, before anything in the folder is touched.
        # lock=False: the caller holds the folder, or its job does (a distributed harvest's rank folders).
        self._folder_lock = durable_lock.exclusive(self.path, "cache") if lock else None
        try:
            self._manifest, self._totals = folder_mod.open_for_writing(self.path, requested, overwrite)
        except BaseException:
            if self._folder_lock is not None:
                self._folder_lock.release()
            raise
        self._text = manifest.ManifestText()
        self._lock = threading.Lock()
        self._buffers = Buffers(shard_rows, len(self.layers), d_model, self._stored, TOKEN_FIELDS,
                                keep=max_inflight + 2)
        self._asm = {s: ShardAssembler(self._buffers) for s in SPLITS}
        self._next_index = {s: len(self._manifest["shards"][s]) for s in SPLITS}
        self._seq = 0
        self._cursor = {s: self.resume_point(s) for s in SPLITS}
        self._appended = {s: self._manifest["rows"][s] for s in SPLITS}
        self._stagers: dict[torch.device, DeviceStager] = {}
        self._closed = False
        self._async = async_write
        # Synchronous writing is the same pipeline with one shard at a time, waited for: statistics are
        # then computed on its worker thread, asynchronous writing's on the pipeline's statistics thread,
        # each with one torch thread (the float64 redo of an overflowing layer is a torch sum).
        self._pipeline = Pipeline(prepare=self._prepare, commit=self._commit, discard=self._discard,
                                  next_index=self._next_index, workers=workers if async_write else 1,
                                  max_inflight=max_inflight if async_write else 1,
                                  max_uncommitted=max_uncommitted if async_write else 1,
                                  commit_interval=COMMIT_INTERVAL if async_write else 0.0,
                                  early=self._early_stats if async_write else None)

    @staticmethod
    def _check_args(layers: list[int], d_model: int, dtype: str, shard_rows: int, backend: str,
                    zarr_compression: str | None, identity: object, metadata: object) -> None:
        if not layers or len(set(layers)) != len(layers) or not all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layers):
            raise ValueError(f"layers must be a non-empty list of distinct block numbers >= 0, got {layers!r}")
        if not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        if dtype not in STORED_DTYPES and not encoding.is_encoded(dtype):
            raise ValueError(f"dtype must be one of {sorted(STORED_DTYPES) + list(encoding.ENCODED_DTYPES)}, "
                             f"got {dtype!r}")
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
        error = self._pipeline.error
        if error is not None:
            raise error
        if self._closed:
            raise RuntimeError(f"CacheWriter for {self.path} is closed")

    def _validate(self, acts: dict[int, torch.Tensor], tokens: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The appended activations in layer order, checked (not yet copied); the token fields are checked."""
        merged: dict[int | str, Any] = {**dict(acts.items()), **dict(tokens.items())} if isinstance(acts, dict) else {}
        bad = [k for k, v in merged.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise ValueError(f"append() needs torch tensors; not a tensor: {bad}")
        if not isinstance(acts, dict) or set(acts) != set(self.layers):
            got = sorted(acts) if isinstance(acts, dict) else type(acts).__name__
            raise ValueError(f"acts must map exactly the cache's layers {self.layers} to tensors, got {got}")
        n = acts[self.layers[0]].shape[0] if acts[self.layers[0]].ndim else -1
        out = []
        for layer in self.layers:
            a = acts[layer]
            if a.shape != (n, self.d_model) or not a.is_floating_point():
                raise ValueError(f"acts[{layer}] must be a float tensor [n, {self.d_model}] with the same n "
                                 f"for every layer, got {a.dtype} {tuple(a.shape)}")
            out.append(a.detach())
        for name, dtype in TOKEN_FIELDS.items():
            t = tokens[name]
            if t.shape != (n,) or t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
                raise ValueError(f"{name} must be an integer tensor [{n}], got {t.dtype} {tuple(t.shape)}")
            info = torch.iinfo(dtype)
            lo, hi = torch.aminmax(t) if n else (0, 0)  # one pass (each torch call retakes the interpreter lock)
            if int(lo) < 0 or int(hi) > info.max:
                raise ValueError(f"{name} values must lie in [0, {info.max}] to be stored as {dtype}")
        return out

    def append(self, split: str, *, chunk: int, offset: int, acts: dict[int, torch.Tensor],
               token_ids: torch.Tensor, sequence: torch.Tensor, position: torch.Tensor,
               document: torch.Tensor, copy: bool = True) -> None:
        """Add rows [offset, offset+n) of producer chunk `chunk` to `split`.

        acts[L]: [n, d_model], any float dtype and device (cast to the stored dtype; CUDA rows are
        assembled on their GPU). token_ids, sequence, position, document: integer [n]. With copy=True
        the tensors are copied before append returns (on CUDA: the copy is queued on the current
        stream), so the caller may reuse them. copy=False hands the activations over: host tensors
        already in the stored dtype are then written from where they are, with no copy, and the caller
        must not change them afterwards. Emits a shard each time shard_rows rows are buffered; its `end`
        cursor is (chunk, offset) of the row after its last row.
        """
        self._raise_if_failed()
        self._split(split)
        chunk, offset = _check_int("chunk", chunk), _check_int("offset", offset)
        if (chunk, offset) < self._cursor[split]:
            raise ValueError(f"append({split!r}, chunk={chunk}, offset={offset}) starts before the end of the "
                             f"rows already appended (chunk, offset) = {self._cursor[split]}; rows would repeat")
        tokens = {"token_ids": token_ids, "sequence": sequence, "position": position, "document": document}
        layer_rows = self._validate(acts, tokens)
        n = token_ids.shape[0]
        self._cursor[split] = (chunk, offset + n)
        self._appended[split] += n
        asm, start = self._asm[split], 0
        while start < n:
            start += asm.add(chunk, offset, layer_rows, tokens, start, copy=copy)
            if asm.full():
                self._emit(split)

    def _emit(self, split: str) -> None:
        pending = self._asm[split].pop()
        rows, tokens = pending.rows, pending.tokens
        index = self._next_index[split]
        name = shard_name(split, index, self.backend)
        self._next_index[split] += 1
        token_views = {k: v[:rows] for k, v in tokens.items()}
        if pending.device is not None:
            block = pending.device
            stager = self._stager(block.device)
            staged = stager.stage(block, rows, self._buffers.acts(block.device))
            host = staged.host
            if host.codes is not None:  # an 8-bit cache, encoded on the device: codes and scales
                assert host.row is not None and host.col is not None
                codes = [(host.codes[i, :rows], host.row[i, :rows], host.col[i]) for i in range(len(self.layers))]
                shard = _Shard([[q] for q, _, _ in codes], token_views, host.sums, host.sq[:, :rows], staged.event,
                               codes)
            else:
                shard = _Shard([[host.acts[i, :rows]] for i in range(len(self.layers))], token_views, host.sums,
                               host.sq[:, :rows], staged.event)

            def release() -> None:
                stager.give(host, staged.event)  # waits for the copy: never recycle a buffer it still writes
                self._buffers.tokens.give(tokens)
        else:
            shard = _Shard(pending.host, token_views)
            host_block, pool = pending.block, self._buffers.acts(torch.device("cpu"))

            def release() -> None:
                if host_block is not None:
                    pool.give(host_block)
                self._buffers.tokens.give(tokens)

        self._seq += 1
        self._pipeline.submit(Job(self._seq, split, index, name, rows, pending.end, shard, release))
        if not self._async:
            self._pipeline.drain()

    def _stager(self, device: torch.device) -> DeviceStager:
        if device not in self._stagers:
            self._stagers[device] = DeviceStager(device, self._buffers.shape, self._stored, keep=self._buffers.keep,
                                                 encoded=encoding.is_encoded(self.dtype))
        return self._stagers[device]

    # ---- preparing and committing (on the pipeline's threads) ------------------------------------
    def _early_stats(self, job: Job) -> None:
        """The statistics of host rows stored as they are, ahead of the shard's write (pipeline.py says
        why); 8-bit rows are encoded first in `_prepare`, and rows from a GPU came with theirs."""
        shard = job.payload
        assert isinstance(shard, _Shard)
        if shard.sums is None and shard.event is None and not encoding.is_encoded(self.dtype):
            shard.sums, shard.sq = host_row_sums(shard.acts, job.rows, self.d_model)

    def _prepare(self, job: Job) -> None:
        shard = job.payload
        assert isinstance(shard, _Shard)
        if shard.event is not None:
            shard.event.synchronize()
        codes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        try:
            if shard.codes is not None:  # 8-bit, encoded on the GPU with the statistics of the decoded values
                codes = shard.codes
                for _, row, col in codes:
                    encoding.check_scales(row, col)
            elif encoding.is_encoded(self.dtype):
                # 8-bit rows on the host: encoded here, on a worker thread; statistics of the decoded values.
                codes = [encoding.encode(torch.cat(p) if len(p) > 1 else p[0]) for p in shard.acts]
                shard.acts = [[encoding.decode(q, s, c)] for q, s, c in codes]
        except ValueError as exc:
            raise ValueError(f"shard {job.name}: {exc}") from None
        if shard.sums is None:
            sums, sq = host_row_sums(shard.acts, job.rows, self.d_model)
        else:
            assert shard.sq is not None  # computed with the sums
            sums, sq = shard.sums, shard.sq
        try:
            per_layer = dict(zip(self.layers, combine(sums.numpy(), sq.numpy(), shard.acts), strict=True))
        except ValueError as exc:
            raise ValueError(f"shard {job.name}: {exc}") from None
        tensors: dict[str, torch.Tensor | list[torch.Tensor]] = {
            layer_key(L): shard.acts[i] for i, L in enumerate(self.layers)}
        for L, (q, row, col) in zip(self.layers, codes, strict=False):  # 8-bit: codes and scales instead
            tensors[layer_key(L)] = q
            tensors[encoding.row_scale_key(L)] = row
            tensors[encoding.col_scale_key(L)] = col
        tensors.update(shard.tokens)
        for layer, s in per_layer.items():
            k_sum, k_sq, k_norm = stat_keys(layer)
            tensors[k_sum] = torch.from_numpy(s.sum)
            tensors[k_sq] = torch.tensor(s.sumsq, dtype=torch.float64)
            tensors[k_norm] = torch.tensor(s.sumnorm, dtype=torch.float64)
        nbytes, digest = shardio.write_tmp(self.path, job.name, tensors, self.backend, self.zarr_compression)
        job.result = _Written(nbytes, digest, per_layer)

    def _commit(self, jobs: list[Job]) -> None:
        """Publish `jobs` (each split's in index order, following its last committed shard) and rewrite
        the manifest once; the in-memory manifest changes only if the rewrite succeeded."""
        shardio.publish(self.path, [job.name for job in jobs])
        with self._lock:
            m = self._manifest
            new = {**m, "shards": {s: list(v) for s, v in m["shards"].items()}, "rows": dict(m["rows"]),
                   "stats": dict(m["stats"])}
            totals = dict(self._totals)
            for job in jobs:
                w = job.result
                assert isinstance(w, _Written)
                new["shards"][job.split].append({"name": job.name, "rows": job.rows, "bytes": w.nbytes,
                                                 "xxh3": w.digest, "end": list(job.end)})
                new["rows"][job.split] += job.rows
                if totals[job.split] is self._totals[job.split]:
                    totals[job.split] = totals[job.split].copy()
                totals[job.split].add(job.rows, w.sums)
            for split in {job.split for job in jobs}:
                new["stats"][split] = totals[split].to_manifest()
            self._save(new, f"the manifest after shard {jobs[-1].name}")
            self._manifest, self._totals = new, totals

    def _discard(self, job: Job) -> None:
        shardio.remove_tmp(self.path, job.name)

    def _save(self, m: dict, what: str) -> None:
        try:
            manifest.save(self.path, m, self._text)
        except OSError as exc:
            raise describe_os_error(exc, f"{what} in {self.path}") from exc

    # ---- ending -------------------------------------------------------------------------------
    def flush(self) -> None:
        """Write every buffered row as a (possibly short) shard and wait until all are committed."""
        self._raise_if_failed()
        for split in SPLITS:
            if self._asm[split].rows:
                self._emit(split)
        self._pipeline.drain()

    def finish(self, extra_metadata: dict | None = None) -> None:
        """flush(), merge extra_metadata into metadata, mark the cache complete, release the writer."""
        self.flush()
        with self._lock:
            new = dict(self._manifest)
            if extra_metadata:
                new["metadata"] = {**new["metadata"],
                                   **folder_mod.json_roundtrip(extra_metadata, "extra_metadata")}
            new["complete"] = True
            self._save(new, "the final manifest")
            self._manifest = new
        self.close()

    def close(self) -> None:
        """Stop without writing buffered rows (error paths). Shards already emitted are still committed
        (or, after an error, dropped with their temporaries)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._pipeline.close()
        finally:
            if self._folder_lock is not None:
                self._folder_lock.release()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def manifest(self) -> dict:
        """A snapshot of the manifest as last committed (a deep copy; safe to read)."""
        with self._lock:
            return copy.deepcopy(self._manifest)
