"""A sweep from start to summary: check it fits, pick the members this process trains, run the one
pass, write `<output_dir>/<sweep>/sweep_summary.json`.

Under torchrun (W processes), the rule:
- at least W members: the members are spread over the ranks (member i on rank i mod W); each rank
  reads every batch once for its own members, and each member trains as a 1-process run;
- fewer members than ranks: every member trains data-parallel over all W ranks (each rank steps
  every member on its rows of each global batch, as `make train NPROC=W` does).
Either way rank 0 gathers the outcomes and writes the summary.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import durable
from settings.device import resolve_device
from train.build import BuildError, LayerChoice, check_d_in, resolve_layers
from train.distributed import DataParallel, env_world_size
from train.layout import SWEEP_SUMMARY_FILE
from train.loop import TrainState
from train.run import TrainError, open_training_cache, user_errors
from train.sweep.memory import Estimate, estimate
from train.sweep.onepass import OnePass, Outcome
from train.sweep.spec import Sweep, SweepError

SUMMARY_FILE = SWEEP_SUMMARY_FILE


@dataclass
class SweepResult:
    outcomes: list[Outcome]
    mode: str  # one process | members over ranks | data-parallel
    bytes_read: int  # by this process's reader
    batches_read: int
    seconds: float
    estimate: Estimate | None = None
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def stopped(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != "done"]


def plan_layers(sweep: Sweep) -> tuple[Any, list[LayerChoice]]:
    """(the cache, each member's layers); a member that does not fit the cache is refused by name."""
    data = open_training_cache(sweep.members[0].config.training.cache)
    choices = []
    for m in sweep.members:
        try:
            choices.append(resolve_layers(m.config.model, data.layers, str(data.path)))
            check_d_in(m.config.model, data.d_model)
        except BuildError as e:
            raise SweepError(f"{sweep.path}: member {m.name}: {e}") from e
    return data, choices


def check_memory(sweep: Sweep, data: Any, choices: list[LayerChoice], device: torch.device) -> Estimate:
    layers = sorted({x for c in choices for x in c.layers})
    est = estimate([m.config for m in sweep.members], choices, data.d_model, len(layers),
                   torch.empty(0, dtype=data.dtype).element_size(), device)
    if est.available is not None and est.total > est.available:
        raise SweepError(f"sweep {sweep.name} ({len(sweep.members)} members) would not fit on {device}: "
                         f"{est.describe()}; run fewer members per sweep, smaller dictionaries, a smaller "
                         "training.batch_size or training.shuffle_buffer_rows")
    return est


def run_sweep(sweep: Sweep, *, say: Callable[[str], None] | None = None,
              after_step: Callable[[str, TrainState], None] | None = None) -> SweepResult:
    """Train every member (this process's share under torchrun). Raises what stops the whole sweep
    (SweepError before it starts, or the exception that killed it); members that stop alone are in
    the result's outcomes."""
    say = say or (lambda msg: print(msg, file=sys.stderr))
    data, choices = plan_layers(sweep)
    device = resolve_device(sweep.members[0].config.training.device, key="training.device")
    world = env_world_size()
    group = DataParallel.start(device) if world > 1 else None
    if group is not None:
        device = group.device(device)
    est = check_memory(sweep, data, choices, device)
    if group is None:
        mode, mine, dp = "one process", list(range(len(sweep.members))), None
    elif len(sweep.members) >= group.world:
        mode, mine, dp = "members over ranks", list(range(group.rank, len(sweep.members), group.world)), None
    else:
        mode, mine, dp = "data-parallel", list(range(len(sweep.members))), group
    speak = say if group is None or group.is_main else (lambda msg: None)
    speak(f"sweep {sweep.name}: {len(sweep.members)} members ({mode}) into {sweep.output_dir}; {est.describe()}")
    layers = sorted({x for i in mine for x in choices[i].layers})
    onepass = OnePass([(sweep.members[i].name, sweep.members[i].config) for i in mine],
                      say=say if mode == "members over ranks" else speak, dp=dp, after_step=after_step,
                      user_errors=user_errors())
    start = time.perf_counter()
    try:
        outcomes = onepass.run(layers)
    except BaseException:
        if group is not None:
            group.close(normal_end=False)
        raise
    seconds = time.perf_counter() - start
    failed = [o for o in outcomes if o.status == "failed" and o.error is not None]
    if failed:  # not a member's own stop: a bug or a kill stops the sweep
        if group is not None:
            group.close(normal_end=False)
        raise failed[0].error  # type: ignore[misc]
    result = SweepResult(outcomes, mode, onepass.bytes_read, onepass.batches_read, seconds, est)
    everyone = _gather(group, result)
    if group is None or group.is_main:
        result.summary = _summary(sweep, mode, everyone, seconds, est)
        durable.atomic_write_json(sweep.output_dir / SUMMARY_FILE, result.summary)
        _report(speak, sweep, result.summary)
    if group is not None:
        group.close()
    return result


def _gather(group: DataParallel | None, result: SweepResult) -> list[dict[str, Any]]:
    mine = {"outcomes": [_outcome_record(o) for o in result.outcomes], "bytes_read": result.bytes_read,
            "batches_read": result.batches_read}
    if group is None or result.mode == "data-parallel":
        return [mine]
    gathered: list[Any] = [None] * group.world
    dist.all_gather_object(gathered, mine)
    return gathered


def _outcome_record(o: Outcome) -> dict[str, Any]:
    heldout = o.summary.get("heldout", {}) if o.summary else {}
    return {"member": o.name, "status": o.status, "reason": o.reason, "run_dir": o.run_dir,
            "steps": o.summary.get("steps"), "heldout_fvu": heldout.get("fvu"), "heldout_l0": heldout.get("l0"),
            "dead_fraction": heldout.get("dead_fraction")}


def _summary(sweep: Sweep, mode: str, parts: list[dict[str, Any]], seconds: float, est: Estimate) -> dict[str, Any]:
    by_name = {r["member"]: r for p in parts for r in p["outcomes"]}
    members = [{**by_name[m.name], "variation": m.variation} for m in sweep.members if m.name in by_name]
    return {
        "sweep": sweep.name, "file": str(sweep.path), "mode": mode, "processes": len(parts),
        "members": members,
        "stopped": [{"member": r["member"], "status": r["status"], "reason": r["reason"]}
                    for r in members if r["status"] != "done"],
        "cache_bytes_read": sum(p["bytes_read"] for p in parts),
        "batches_read": sum(p["batches_read"] for p in parts),
        "seconds": seconds,
        "memory_estimate_bytes": est.total,
    }


def _report(say: Callable[[str], None], sweep: Sweep, summary: dict[str, Any]) -> None:
    for r in summary["members"]:
        if r["status"] == "done":
            say(f"  {r['member']}: held-out FVU {r['heldout_fvu']}, L0 {r['heldout_l0']}")
    for r in summary["stopped"]:
        say(f"  {r['member']}: {r['status']}: {r['reason']}")
    say(f"sweep {sweep.name}: {len(summary['members']) - len(summary['stopped'])} of {len(summary['members'])} "
        f"members done; read {summary['cache_bytes_read']:,} bytes of the cache in {summary['batches_read']} batches; "
        f"summary {Path(sweep.output_dir) / SUMMARY_FILE}")


__all__ = ["SUMMARY_FILE", "SweepResult", "TrainError", "run_sweep"]
