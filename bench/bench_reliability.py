"""What issue 15's guarantees cost: training tokens/s with verified reads on and off, and the wall time
of a training and of a harvest with and without the folder locks. Runs alternate (A B A B ...), so that
each pair shares the machine's load; ratios compare figures from this one run.

    flock /work/bench.lock .venv/bin/python bench/bench_reliability.py --cache /work/caches/minilm-default \\
        --work /work/scratch-reliability/bench --steps 120 --reps 2

Results: bench/RESULTS.md, "Reliability (issue 15)".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())  # run from the repository root
import durable.lock as lock_mod  # noqa: E402
from settings import load_config  # noqa: E402
from train.run import train  # noqa: E402


@contextlib.contextmanager
def locks_disabled():
    """exclusive/shared as no-ops: the lock's cost is the difference."""
    ex, sh = lock_mod.exclusive, lock_mod.shared

    def fake(folder, what="folder"):
        return lock_mod.FolderLock(Path(folder), "exclusive", None)

    lock_mod.exclusive = lock_mod.shared = fake  # type: ignore[assignment]
    try:
        yield
    finally:
        lock_mod.exclusive, lock_mod.shared = ex, sh


def train_once(cache: str, work: Path, steps: int, verify: bool) -> dict:
    shutil.rmtree(work / "runs", ignore_errors=True)
    cfg = load_config(["configs/default.yaml", "configs/sae/topk.yaml"], [
        f"training.cache={cache}", f"training.output_dir={work / 'runs'}", "training.run_name=bench",
        f"training.steps={steps}", "training.device=cpu", f"training.verify_reads={str(verify).lower()}",
        "evaluate.max_tokens=4096", "training.log_every=1000"])
    t0 = time.perf_counter()
    result = train(cfg, say=lambda m: None)
    return {"tokens_per_s": result.summary["tokens_per_s"], "wall_s": time.perf_counter() - t0}


def harvest_once(work: Path, tokens: int) -> float:
    from harvest.run import harvest

    out = work / "cache"
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(["configs/default.yaml"], [f"harvest.output={out}", f"harvest.max_tokens={tokens}",
                                                 "harvest.device=cpu"])
    t0 = time.perf_counter()
    harvest(cfg, progress=False)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cache", default="/work/caches/minilm-default")
    p.add_argument("--work", default="/work/scratch-reliability/bench")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--harvest-tokens", type=int, default=20000)
    p.add_argument("--skip", default="", help="comma list of parts to skip: verify,lock_train,lock_harvest")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(1)  # the machine is shared; one thread each keeps the pairs comparable
    report: dict = {"note": "2-core machine shared with other helpers' jobs: compare only ratios of this run",
                    "load_average_start": os.getloadavg()}
    skip = set(args.skip.split(","))
    if "verify" not in skip:
        train_once(args.cache, work, 10, verify=False)  # warm the page cache and the code paths
        runs: dict[str, list] = {"on": [], "off": []}
        for _ in range(args.reps):
            for mode in ("on", "off"):
                runs[mode].append(train_once(args.cache, work, args.steps, verify=mode == "on"))
                print(mode, runs[mode][-1], flush=True)
        on = statistics.median(r["tokens_per_s"] for r in runs["on"])
        off = statistics.median(r["tokens_per_s"] for r in runs["off"])
        report["verified_reads"] = {"runs": runs, "median_tokens_per_s_on": on, "median_tokens_per_s_off": off,
                                    "ratio_on_over_off": on / off}
    if "lock_train" not in skip:
        walls: dict[str, list] = {"locked": [], "unlocked": []}
        for _ in range(args.reps):
            walls["locked"].append(train_once(args.cache, work, 20, verify=False)["wall_s"])
            with locks_disabled():
                walls["unlocked"].append(train_once(args.cache, work, 20, verify=False)["wall_s"])
            print(walls, flush=True)
        report["lock_training_wall_s"] = walls
    if "lock_harvest" not in skip:
        walls = {"locked": [], "unlocked": []}
        harvest_once(work, args.harvest_tokens)  # loads the model's code and weights into the page cache
        for _ in range(args.reps):
            walls["locked"].append(harvest_once(work, args.harvest_tokens))
            with locks_disabled():
                walls["unlocked"].append(harvest_once(work, args.harvest_tokens))
            print(walls, flush=True)
        report["lock_harvest_wall_s"] = walls
    report["load_average_end"] = os.getloadavg()
    print(json.dumps(report, indent=1))
    (work / "report.json").write_text(json.dumps(report, indent=1))
    shutil.rmtree(work / "runs", ignore_errors=True)
    shutil.rmtree(work / "cache", ignore_errors=True)


if __name__ == "__main__":
    main()
