"""The harvest loop: text stream -> shuffle windows -> forward to the deepest block -> cache writer.

A run is one or more *segments*. A segment consumes the packed-sequence stream under one token
budget, with each split's windows anchored at the segment's start sequence. A fresh cache is one
segment from sequence 0. A rerun with the same identity:
- incomplete cache (a crash): finishes the interrupted segment under the budget it was started
  with; sequences before the writer's resume cursor are skipped without a forward, the cursor's
  window is recomputed (same rows, same shuffle) and appended from the cursor's offset;
- complete cache, larger budget: a new segment starting at the sequences the previous one did not
  consume (recorded by `finish`), so the previous final, partial window is never recomputed;
- complete cache, same or smaller budget (or a previous whole-source run): nothing to do. A larger
  budget than the source holds runs one extension that finds nothing more, and is then recorded.
The segment's start and budget are kept in the manifest metadata (`harvest_segment`) so that a
crash during an extension resumes the extension, and `finish` records what it consumed
(`harvest_finished`).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

import cache
from cache import folder
from cache import manifest as manifest_mod
from cache.encoding import is_encoded
from cache.names import SPLITS
from durable import lock as durable_lock
from harvest import text
from harvest.capture import WindowSink, compute_window
from harvest.identity import build_identity, build_metadata
from harvest.model import (
    HarvestError,
    LoadedModel,
    config_d_model,
    config_n_blocks,
    dtype_name,
    load_config,
    load_model,
    parse_layers,
    resolve_dtype,
)
from harvest.packing import PackedSequence
from harvest.tokenization import pad_id
from harvest.windows import group_windows, plan_window
from settings import Config, HarvestConfig, to_dict
from settings.device import resolve_device

SEGMENT_KEY = "harvest_segment"
FINISHED_KEY = "harvest_finished"


@dataclass
class Segment:
    budget: int | None  # max_tokens of the packed stream (None = the whole source)
    start: dict[str, int]  # first sequence of the segment's first window, per split


@dataclass
class HarvestSummary:
    path: str
    status: str  # "harvested" | "resumed" | "extended" | "up to date"
    rows: dict[str, int] = field(default_factory=dict)  # rows in the cache per split
    new_rows: int = 0  # rows written by this run
    bytes_on_disk: int = 0
    seconds: float = 0.0  # the whole call
    loop_seconds: float = 0.0  # text, forward and writing (no start-up, no model loading)

    @property
    def tokens_per_s(self) -> float:
        return self.new_rows / self.loop_seconds if self.loop_seconds > 0 else 0.0

    def lines(self) -> list[str]:
        total = sum(self.rows.values())
        return [
            f"harvest: {self.status}: {self.path}",
            f"  tokens: {total:,} (train {self.rows.get('train', 0):,}, heldout {self.rows.get('heldout', 0):,}); "
            f"written now: {self.new_rows:,}",
            f"  bytes on disk: {self.bytes_on_disk:,} ({self.bytes_on_disk / max(total, 1):,.0f} per token)",
            f"  time: {self.seconds:.1f} s ({self.loop_seconds:.1f} s harvesting, {self.tokens_per_s:,.0f} tokens/s)",
        ]


def check_harvest_settings(cfg: Config) -> None:
    """Semantic checks of cfg.harvest / cfg.data that the type checker of settings cannot make."""
    hv, data = cfg.harvest, cfg.data
    positive = {"harvest.batch_size": hv.batch_size, "harvest.shuffle_window": hv.shuffle_window,
                "harvest.shard_rows": hv.shard_rows, "data.max_length": data.max_length}
    for key, value in positive.items():
        if value < 1:
            raise HarvestError(f"{key}={value} must be at least 1")
    if hv.max_tokens is not None and hv.max_tokens < 1:
        raise HarvestError(f"harvest.max_tokens={hv.max_tokens} must be at least 1 (or null for the whole source)")
    if hv.backend not in ("safetensors", "zarr"):
        raise HarvestError(f"harvest.backend={hv.backend!r} is not a cache backend; use safetensors or zarr")
    if hv.zarr_compression is not None and hv.backend != "zarr":
        raise HarvestError("harvest.zarr_compression applies to harvest.backend=zarr only; unset it or use zarr")


def _budget_exceeds(new: int | None, old: int | None) -> bool:
    if old is None:
        return False
    return new is None or new > old


def plan_segment(existing: dict | None, same: bool, budget: int | None) -> tuple[Segment | None, str]:
    """What to do next at the output folder: (segment to run or None, status word). `same`: the cache
    there (if any) has this run's identity and layout."""
    fresh = Segment(budget, {s: 0 for s in SPLITS})
    if existing is None or not same:
        return fresh, "harvested"
    meta = existing["metadata"]
    if not existing["complete"]:
        seg = meta.get(SEGMENT_KEY)
        if not isinstance(seg, dict):
            return fresh, "resumed"
        return Segment(seg.get("budget"), {s: int(seg["start"][s]) for s in SPLITS}), "resumed"
    done = meta.get(FINISHED_KEY) or {}
    if "next_sequence" not in done or not _budget_exceeds(budget, done.get("budget")):
        return None, "up to date"
    return Segment(budget, {s: int(done["next_sequence"][s]) for s in SPLITS}), "extended"


def requested_manifest(run: _Run, hv: HarvestConfig) -> dict:
    """The cache this run would write (identity and layout), for the cache package to judge the folder."""
    return manifest_mod.new(identity=run.identity, metadata={}, layers=run.layers, d_model=run.d_model,
                            dtype=run.store_name, backend=hv.backend, shard_rows=hv.shard_rows,
                            zarr_compression=hv.zarr_compression)


def _start_points(committed: dict | None, seg: Segment) -> tuple[dict[str, int], dict[str, int]]:
    """First window start and row offset into it, per split, from the resume cursor of the last
    committed shard (`committed`: the manifest of the cache being continued, or None)."""
    starts, offsets = {}, {}
    for split in SPLITS:
        shards = committed["shards"][split] if committed else []
        chunk, offset = shards[-1]["end"] if shards else (0, 0)
        if chunk < seg.start[split] or not shards:
            starts[split], offsets[split] = seg.start[split], 0  # nothing of this segment committed yet
        else:
            starts[split], offsets[split] = int(chunk), int(offset)
    return starts, offsets


def harvest_stream(lm: LoadedModel, sequences: Iterable[PackedSequence], writer: cache.CacheWriter, *,
                   layers: list[int], store_dtype: torch.dtype, seed: int, batch_size: int, shuffle_window: int,
                   starts: dict[str, int], offsets: dict[str, int], pad_id: int,
                   progress: tqdm | None = None, owns: Callable[[str, int], bool] | None = None) -> dict[str, int]:
    """Harvest an iterator of PackedSequence into `writer`, windows anchored at `starts` (the first
    window of split s appends from row `offsets[s]`). `owns(split, chunk)`: whether this process
    harvests that window (None: all; a distributed rank skips the others without a forward).
    Returns, per split, the index of the next sequence not consumed (by any process)."""
    next_seq = dict(starts)
    sink = WindowSink(writer, lm.device)
    try:
        for split, chunk, seqs in group_windows(sequences, shuffle_window, starts):
            if owns is not None and not owns(split, chunk):
                next_seq[split] = chunk + len(seqs)
                continue
            plan = plan_window(split, chunk, seqs, batch_size=batch_size, seed=seed, pad_id=pad_id)
            acts = compute_window(lm, layers, plan, store_dtype)
            offset = offsets[split] if chunk == starts[split] else 0
            sink.submit(plan, acts, offset)
            next_seq[split] = chunk + plan.n_sequences
            if progress is not None:
                progress.update(max(plan.rows - offset, 0))
    finally:
        sink.close()
    return next_seq


def harvest(cfg: Config, *, progress: bool = True, owns: Callable[[str, int], bool] | None = None,
            extra_metadata: dict | None = None, hold: bool = True) -> HarvestSummary:
    """Run stage 1 for `cfg` (a settings.Config): fresh, resumed, extended or a no-op. An existing
    cache with the same identity is continued even with `harvest.overwrite` (overwrite only permits
    replacing a *different* cache). `owns` and `extra_metadata` serve a distributed rank
    (harvest.distributed): only the windows it owns are harvested, and the metadata says so; `hold=False`
    leaves the output unlocked (a rank's folder: rank 0 holds the job's cache)."""
    t0 = time.perf_counter()
    run = _prepare(cfg)
    out = Path(cfg.harvest.output)
    with hold_output(out) if hold else contextlib.nullcontext():
        return _harvest_locked(cfg, run, out, t0, progress, owns, extra_metadata)


@contextlib.contextmanager
def hold_output(out: Path) -> Iterator[None]:
    """Hold the output cache for writing for the whole harvest (durable.lock): a second harvest, or one
    against a training reading this cache, is refused at once naming the holder; OVERWRITE=1 does not
    break the lock."""
    try:
        lock = durable_lock.exclusive(out, "cache")
    except durable_lock.LockHeld as e:
        raise HarvestError(f"harvest.output: {e}") from None
    try:
        for note in lock.notes:
            print(f"harvest: {note}", file=sys.stderr)
        yield
    finally:
        lock.release()


def _harvest_locked(cfg: Config, run: _Run, out: Path, t0: float, progress: bool,
                    owns: Callable[[str, int], bool] | None, extra_metadata: dict | None) -> HarvestSummary:
    try:  # the cache package decides, before a large model is loaded for nothing
        action = folder.plan_write(folder.survey(out, requested_manifest(run, cfg.harvest)),
                                   overwrite=cfg.harvest.overwrite)
    except folder.FolderRefused as e:
        raise HarvestError(f"harvest.output: {e}") from e
    existing = folder.existing_manifest(out) if action == "continue" else None
    seg, status = plan_segment(existing, True, cfg.harvest.max_tokens)
    if seg is None:
        return _summary(out, status, 0, t0, 0.0)
    mc = cfg.model
    lm = load_model(run.resolved, revision=mc.revision, dtype=dtype_name(run.compute_dtype), device=str(run.device),
                    trust_remote_code=mc.trust_remote_code, device_map=mc.device_map)
    t_loop = time.perf_counter()
    new_rows = _run_segments(cfg, lm, run, out, seg, committed=existing, overwrite=action == "replace",
                             progress=progress, owns=owns, extra_metadata=extra_metadata or {})
    return _summary(out, status, new_rows, t0, time.perf_counter() - t_loop)


def _run_segments(cfg: Config, lm: LoadedModel, run: _Run, out: Path, seg: Segment | None, *,
                  committed: dict | None, overwrite: bool, progress: bool, owns: Callable[[str, int], bool] | None,
                  extra_metadata: dict) -> int:
    """Run `seg` and whatever follows it (an extension after a resumed segment); returns rows written."""
    hv = cfg.harvest
    facts = text.tokenizer_description(run.tokenizer, text.special_layout(run.tokenizer))
    base_meta = build_metadata(cfg, lm, resolved_model=run.resolved, tokenizer=run.tokenizer, tokenizer_facts=facts,
                               resolved_config=to_dict(cfg)) | extra_metadata
    new_rows = 0
    while seg is not None:
        starts, offsets = _start_points(committed, seg)
        stream = iter(text.packed_sequences(cfg.data, run.tokenizer, keep_special_tokens=hv.keep_special_tokens,
                                            max_tokens=seg.budget, start=starts))
        first = next(stream, None)  # before the writer exists, so that an empty corpus leaves no folder behind
        if first is None and committed is None:
            raise HarvestError(f"the text source gave no tokens (data.train_path={cfg.data.train_path!r}); "
                               f"check the path, data.text_field and data.max_samples")
        stream = itertools.chain([first], stream) if first is not None else iter(())
        metadata = {**base_meta, SEGMENT_KEY: {"budget": seg.budget, "start": seg.start}}
        writer = cache.CacheWriter(out, layers=run.layers, d_model=run.d_model, dtype=run.store_name,
                                   shard_rows=hv.shard_rows, identity=run.identity, metadata=metadata,
                                   backend=hv.backend, overwrite=overwrite, zarr_compression=hv.zarr_compression,
                                   async_write=True, lock=False)  # harvest() holds `out` itself
        overwrite = False
        try:
            if any(writer.resume_point(s) != _cursor(committed, s) for s in SPLITS):
                raise RuntimeError(f"cache at {out} changed while harvest was starting; rerun")
            new_rows += _run_segment(cfg, lm, run, writer, seg, stream, starts, offsets, progress, owns)
        except BaseException:
            writer.close()
            raise
        committed = folder.existing_manifest(out)
        seg, _ = plan_segment(committed, True, hv.max_tokens)
    return new_rows


@dataclass
class _Run:
    """What a harvest needs before (and without) loading the model's weights."""

    resolved: str
    layers: list[int]
    d_model: int
    device: torch.device
    compute_dtype: torch.dtype
    store_dtype: torch.dtype  # the dtype rows are captured in: float32 for an 8-bit store dtype
    tokenizer: PreTrainedTokenizerBase
    identity: dict
    store_name: str  # the cache's dtype: the store dtype's name, or an 8-bit one (cache/encoding.py)


def _prepare(cfg: Config) -> _Run:
    check_harvest_settings(cfg)
    mc, hv = cfg.model, cfg.harvest
    resolved = text.resolve_model_path(mc.language_model_path)
    config = load_config(resolved, revision=mc.revision, trust_remote_code=mc.trust_remote_code)
    n_blocks, d_model = config_n_blocks(config), config_d_model(config)
    if n_blocks is None or d_model is None:
        raise HarvestError(f"cannot tell the block count or width of model {mc.language_model_path} (its config "
                           f"has no num_hidden_layers/n_layer or hidden_size/n_embd)")
    layers = parse_layers(hv.layers, n_blocks)
    device = resolve_device(hv.device, key="harvest.device")
    compute_dtype = resolve_dtype(hv.dtype, device)
    if is_encoded(hv.store_dtype):  # the writer encodes float32 rows shard by shard
        store_dtype, store_name = torch.float32, str(hv.store_dtype)
    else:
        store_dtype = compute_dtype if hv.store_dtype == "auto" else resolve_dtype(hv.store_dtype, device,
                                                                                    key="harvest.store_dtype")
        store_name = dtype_name(store_dtype)
    tokenizer = text.load_tokenizer(resolved, mc.revision, mc.trust_remote_code)
    identity = build_identity(cfg, resolved_model=resolved, layers=layers, compute_dtype=compute_dtype,
                              store_dtype=store_name, tokenizer=tokenizer, source=text.source_fingerprint(cfg.data),
                              packing=text.packing_identity(cfg.data, tokenizer, hv.keep_special_tokens))
    identity = json.loads(json.dumps(identity))  # as it reads back from the manifest
    return _Run(resolved, layers, d_model, device, compute_dtype, store_dtype, tokenizer, identity, store_name)


def _cursor(committed: dict | None, split: str) -> tuple[int, int]:
    shards = committed["shards"][split] if committed else []
    return tuple(shards[-1]["end"]) if shards else (0, 0)


def _summary(out: Path, status: str, new_rows: int, t0: float, loop_seconds: float) -> HarvestSummary:
    with cache.open_cache(out) as c:
        rows = {s: c.num_rows(s) for s in SPLITS}
        size = c.size_on_disk()
    return HarvestSummary(str(out), status, rows, new_rows, size, time.perf_counter() - t0, loop_seconds)


def _run_segment(cfg: Config, lm: LoadedModel, run: _Run, writer: cache.CacheWriter, seg: Segment,
                 stream: Iterator[PackedSequence], starts: dict[str, int], offsets: dict[str, int], progress: bool,
                 owns: Callable[[str, int], bool] | None) -> int:
    """Harvest one segment into an open writer and finish it; returns the rows written."""
    hv = cfg.harvest
    before = sum(writer.rows_written(s) for s in SPLITS)
    bar = tqdm(total=seg.budget, initial=before, unit="tok", unit_scale=True, desc="harvest", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    try:
        next_seq = harvest_stream(lm, stream, writer, layers=run.layers, store_dtype=run.store_dtype,
                                  seed=cfg.data.seed, batch_size=hv.batch_size, shuffle_window=hv.shuffle_window,
                                  starts=starts, offsets=offsets, pad_id=pad_id(run.tokenizer), progress=bar,
                                  owns=owns)
        writer.flush()
        rows = {s: writer.rows_written(s) for s in SPLITS}
        writer.finish(extra_metadata={FINISHED_KEY: {"budget": seg.budget, "next_sequence": next_seq, "rows": rows}})
    finally:
        bar.close()
    return sum(rows.values()) - before
