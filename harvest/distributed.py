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

import contextlib
import copy
import os
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from cache import folder
from cache import manifest as manifest_mod
from cache.merge import finish_merge, merge_ranks, rank_folder
from cache.names import DISTRIBUTED_KEY, SPLITS
from durable.launcher import watch_launcher
from harvest.model import HarvestError
from harvest.run import (
    FINISHED_KEY,
    HarvestSummary,
    _prepare,
    _Run,
    _summary,
    harvest,
    hold_output,
    plan_segment,
    requested_manifest,
)
from settings import Config

# Ranks wait for the slowest at the end: a resumed rank may have far more left than the others. A dead
# peer does not wait this long: torchrun stops every rank as soon as one exits with an error.
BARRIER_TIMEOUT = timedelta(hours=24)


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) outside torchrun."""
    try:
        rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", "0"), ("WORLD_SIZE", "1"),
                                                                      ("LOCAL_RANK", "0")))
        return rank, world, local
    except ValueError:
        raise HarvestError("RANK/WORLD_SIZE/LOCAL_RANK must be integers (as torchrun sets them)") from None


def window_owner(rank: int, world: int, shuffle_window: int) -> Callable[[str, int], bool]:
    """owns(split, chunk): whether `rank` harvests the window starting at sequence `chunk`."""
    def owns(split: str, chunk: int) -> bool:
        return (chunk // shuffle_window) % world == rank
    return owns


def harvest_distributed(cfg: Config, *, progress: bool = True) -> HarvestSummary:
    """Stage 1 as one rank of a torchrun job (WORLD_SIZE > 1); every rank returns the merged cache's summary."""
    rank, world, local_rank = world_from_env()
    # A kill -9 of torchrun stops this worker too: SIGTERM, which commits its complete shards and stops
    # (harvest.__main__), instead of harvesting and merging alone (durable.launcher).
    watch_launcher()
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    t0 = time.perf_counter()
    run = _prepare(cfg)
    out = Path(cfg.harvest.output)
    # One holder per job: rank 0 holds <cache> from its decision to the end of the merge; each rank's
    # writer holds only its own rank-<r>/ folder.
    held = contextlib.ExitStack()
    if rank == 0:
        try:
            held.enter_context(hold_output(out))
        except HarvestError as e:
            decision_error: str | None = str(e)
        else:
            decision_error = None
    with held:
        return _harvest_ranks(cfg, run, out, rank, world, local_rank, t0, progress,
                              decision_error if rank == 0 else None)


def _harvest_ranks(cfg: Config, run: _Run, out: Path, rank: int, world: int, local_rank: int, t0: float,
                   progress: bool, refused: str | None) -> HarvestSummary:
    mine = (("error", refused) if refused else _settle_or_error(cfg, run, out, world)) if rank == 0 else None
    decision: list[tuple[str, str | None] | None] = [mine]
    dist.broadcast_object_list(decision, src=0)
    status, error = decision[0] or ("error", "no decision from rank 0")
    if error is not None:
        raise HarvestError(error if rank == 0 else "stopped: rank 0 refused to start (see its error)")
    if status != "harvest":
        dist.barrier()
        dist.destroy_process_group()
        return _done(out, status, world, 0, t0, 0.0)
    part = _rank_config(cfg, rank, world, local_rank)
    own = harvest(part, progress=progress and rank == 0, owns=window_owner(rank, world, cfg.harvest.shuffle_window),
                  extra_metadata={DISTRIBUTED_KEY: {"rank": rank, "world_size": world}}, hold=False)
    results: list[tuple[str, int, float]] = [("", 0, 0.0)] * world
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


def _rank_config(cfg: Config, rank: int, world: int, local_rank: int) -> Config:
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


def _settle_or_error(cfg: Config, run: _Run, out: Path, world: int) -> tuple[str, str | None]:
    try:
        return _settle(cfg, run, out, world), None
    except (HarvestError, ValueError, OSError) as exc:
        return "error", str(exc)


def _settle(cfg: Config, run: _Run, out: Path, world: int) -> str:
    """Rank 0, before any rank starts: what the output folder needs (the cache package decides).
    Returns "harvest", "merged" (an interrupted merge was completed) or "up to date"; raises to refuse."""
    hv = cfg.harvest
    try:
        action = folder.prepare_rank_write(folder.survey(out, requested_manifest(run, hv)), overwrite=hv.overwrite,
                                           world=world)
    except folder.FolderRefused as e:
        raise HarvestError(f"harvest.output: {e}") from e
    if action == "finish-merge":
        finish_merge(out)
        return "merged"
    if action == "complete":
        if plan_segment(folder.existing_manifest(out), True, hv.max_tokens)[0] is None:
            return "up to date"
        raise HarvestError(f"extending the complete cache at {out} under torchrun is not supported; extend it "
                           f"with one process (make harvest NPROC=1), or harvest into a new harvest.output")
    return "harvest"
