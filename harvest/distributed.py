"""Harvest under `torchrun`: W processes (one per GPU, or gloo on CPUs) fill one cache.

- The split: every rank tokenises the same stream under the same budget (cheap) and groups it into
  the same shuffle windows; rank r runs the model only on the windows whose ordinal (chunk //
  shuffle_window) is r modulo W. The rows, their shuffled order inside a window and the stream's end
  are therefore those of a 1-process harvest with the same settings.
- Each rank writes a normal cache (same identity as a 1-process harvest) into `<cache>/rank-<r>/`
  with its own resume cursors: a killed run, rerun with the same W, resumes every rank after its last
  complete shard. A rerun with another W is refused while rank folders exist (their windows were
  dealt for the old W).
- When all ranks are done (a barrier), rank 0 merges the rank caches (cache.merge, crash-safe) into
  one cache at `<cache>/`, with the statistics re-added exactly from the per-shard sums.
- Coordination is a gloo process group on every device: ranks exchange only a barrier and a few small
  Python objects, never tensors, so NCCL would add nothing but its device bookkeeping. Multi-node
  runs need `<cache>` on a filesystem that every node sees (rank 0 reads the other ranks' folders).
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import cache
import durable
from cache import manifest as manifest_mod
from cache.merge import DISTRIBUTED_KEY, finish_merge, merge_pending, merge_ranks, rank_folder, rank_folders
from cache.names import MANIFEST, MERGE_PLAN, SPLITS, is_cache_file
from harvest.model import HarvestError
from harvest.run import (
    FINISHED_KEY,
    HarvestSummary,
    _existing_manifest,
    _prepare,
    _summary,
    differences,
    harvest,
    plan_segment,
)

# Ranks wait for the slowest at the end: a resumed rank may have far more left than the others. A dead
# peer does not wait this long: torchrun stops every rank as soon as one exits with an error.
BARRIER_TIMEOUT = timedelta(hours=24)


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) outside torchrun."""
    try:
        return tuple(int(os.environ.get(k, d)) for k, d in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")))
    except ValueError:
        raise HarvestError("RANK/WORLD_SIZE/LOCAL_RANK must be integers (as torchrun sets them)") from None


def window_owner(rank: int, world: int, shuffle_window: int) -> Callable[[str, int], bool]:
    """owns(split, chunk): whether `rank` harvests the window starting at sequence `chunk`."""
    def owns(split: str, chunk: int) -> bool:
        return (chunk // shuffle_window) % world == rank
    return owns


def harvest_distributed(cfg: object, *, progress: bool = True) -> HarvestSummary:
    """Stage 1 as one rank of a torchrun job (WORLD_SIZE > 1); every rank returns the merged cache's summary."""
    rank, world, local_rank = world_from_env()
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    t0 = time.perf_counter()
    run = _prepare(cfg)
    out = Path(cfg.harvest.output)
    decision = [_settle_or_error(cfg, run, out, world) if rank == 0 else None]
    dist.broadcast_object_list(decision, src=0)
    status, error = decision[0]
    if error is not None:
        raise HarvestError(error if rank == 0 else "stopped: rank 0 refused to start (see its error)")
    if status != "harvest":
        dist.barrier()
        dist.destroy_process_group()
        return _done(out, status, world, 0, t0, 0.0)
    part = _rank_config(cfg, rank, world, local_rank)
    own = harvest(part, progress=progress and rank == 0, owns=window_owner(rank, world, cfg.harvest.shuffle_window),
                  extra_metadata={DISTRIBUTED_KEY: {"rank": rank, "world_size": world}})
    results = [None] * world
    dist.all_gather_object(results, (own.status, own.new_rows, own.loop_seconds))
    if rank == 0:
        merge_ranks(out, world, _merged_metadata(out, world))
    dist.barrier()
    status = "resumed" if any(r[0] == "resumed" for r in results) else "harvested"
    loop = max(r[2] for r in results)
    dist.destroy_process_group()
    return _done(out, status, world, sum(r[1] for r in results), t0, loop)


def _done(out: Path, status: str, world: int, new_rows: int, t0: float, loop: float) -> HarvestSummary:
    return _summary(out, f"{status} by {world} processes", new_rows, t0, loop)


def _rank_config(cfg: object, rank: int, world: int, local_rank: int) -> object:
    part = copy.deepcopy(cfg)
    part.harvest.output = str(rank_folder(Path(cfg.harvest.output), rank))
    if part.model.device_map is None and part.harvest.device in ("auto", "cuda") and torch.cuda.is_available():
        part.harvest.device = f"cuda:{local_rank}"  # one GPU per process on each node
    return part


def _merged_metadata(out: Path, world: int) -> dict:
    """Rank 0's metadata with the whole run's rows and the distributed layout recorded."""
    ranks = [manifest_mod.load(rank_folder(out, r)) for r in range(world)]
    meta = copy.deepcopy(ranks[0]["metadata"])
    finished = meta.get(FINISHED_KEY, {})
    finished["rows"] = {s: sum(m["rows"][s] for m in ranks) for s in SPLITS}
    nexts = [m["metadata"].get(FINISHED_KEY, {}).get("next_sequence") for m in ranks]
    if all(isinstance(n, dict) for n in nexts):
        finished["next_sequence"] = {s: max(int(n[s]) for n in nexts) for s in SPLITS}
    meta[FINISHED_KEY] = finished
    meta[DISTRIBUTED_KEY] = {"world_size": world, "shard_order": "rank-major"}
    return meta


def _settle_or_error(cfg: object, run: object, out: Path, world: int) -> tuple[str, str | None]:
    try:
        return _settle(cfg, run, out, world), None
    except (HarvestError, ValueError, OSError) as exc:
        return "error", str(exc)


def _settle(cfg: object, run: object, out: Path, world: int) -> str:
    """Rank 0, before any rank starts: what the output folder needs. Returns "harvest", "merged" (an
    interrupted merge was completed) or "up to date"; raises HarvestError to refuse."""
    hv = cfg.harvest
    if merge_pending(out):
        finish_merge(out)
        return "merged"
    existing = _existing_manifest(out)
    if existing is not None:
        diffs = differences(existing, run, hv)
        if not diffs and existing["complete"]:
            if plan_segment(existing, True, hv.max_tokens)[0] is None:
                return "up to date"
            raise HarvestError(f"extending the complete cache at {out} under torchrun is not supported; extend it "
                               f"with one process (make harvest NPROC=1), or harvest into a new harvest.output")
        if not diffs:
            raise HarvestError(f"{out} holds an interrupted one-process harvest; resume it with one process "
                               f"(make harvest NPROC=1), or use --overwrite (OVERWRITE=1) to start again")
        if not hv.overwrite:
            raise HarvestError(f"cache at {out} was written with different settings ({', '.join(diffs)} differ); "
                               f"use --overwrite (OVERWRITE=1) to replace it, or choose another harvest.output")
        _remove_parent_cache(out)
    elif (out / MANIFEST).exists():
        if not hv.overwrite:
            raise HarvestError(f"{out / MANIFEST} is unreadable; use --overwrite (OVERWRITE=1) to replace the cache")
        _remove_parent_cache(out)
    _check_rank_folders(out, world, hv.overwrite)
    return "harvest"


def _remove_parent_cache(out: Path) -> None:
    """--overwrite of the merged cache: only the cache's own files (FORMAT.md section 6)."""
    for entry in out.iterdir():
        if is_cache_file(entry.name) or entry.name == MERGE_PLAN:
            durable.remove_path(entry)
    durable.fsync_dir(out)


def _check_rank_folders(out: Path, world: int, overwrite: bool) -> None:
    """Refuse a foreign folder, and rank caches dealt for another world size (unless --overwrite)."""
    if not out.is_dir():
        return
    ranks = rank_folders(out)
    foreign = sorted(e.name for e in out.iterdir() if e not in ranks.values() and not is_cache_file(e.name))
    if foreign:
        raise HarvestError(f"harvest.output={out} is not empty and holds no cache (it holds {', '.join(foreign[:5])}); "
                           f"refusing to touch it: choose a new or empty folder")
    stale = {r: f for r, f in ranks.items() if r >= world or _rank_world(f) not in (None, world)}
    if stale and not overwrite:
        raise HarvestError(f"{out} holds an unfinished harvest by a different number of processes ({len(ranks)} rank "
                           f"folders; this run has {world}): rerun with the same --nproc-per-node (NPROC), or use "
                           f"--overwrite (OVERWRITE=1) to start again")
    for folder in stale.values():
        durable.remove_path(folder)


def _rank_world(folder: Path) -> int | None:
    """The world size a rank cache was written for (None: no readable manifest, the writer decides)."""
    try:
        with cache.open_cache(folder, allow_incomplete=True) as c:
            info = c.manifest["metadata"].get(DISTRIBUTED_KEY)
    except (ValueError, OSError):
        return None
    return info.get("world_size") if isinstance(info, dict) else -1
