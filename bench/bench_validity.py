"""What issue 17's validity checks cost, against the checkout before them: `cache verify` (now also
decoding every stored value for NaN/inf), `cache.open` (now reading every shard's header and
statistics), and a training with verified reads (now also checking each layer it reads for NaN/inf,
once per shard). Each measurement runs in a fresh process of one checkout, alternating A B A B so that
each pair shares the machine's load; ratios compare figures from this one run.

    flock /work/bench.lock .venv/bin/python bench/bench_validity.py --cache /work/scratch-cache-valid/minilm-link \\
        --before /work/scratch-cache-valid/main-wt --work /work/scratch-cache-valid/bench --steps 60 --reps 2

Results: bench/RESULTS.md, "Validity checks (issue 17)".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r'''
import json, sys, time, shutil
import torch
torch.set_num_threads(1)
what, cache_path, work, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
out = {}
if what == "open":
    import cache
    t0 = time.perf_counter(); c = cache.open(cache_path); out["open_s"] = time.perf_counter() - t0
elif what == "verify":
    import cache
    t0 = time.perf_counter(); r = cache.verify_report(cache_path); out["verify_s"] = time.perf_counter() - t0
    out["problems"] = len(r.problems); out["bytes"] = r.bytes_checked
else:
    from settings import load_config
    from train.run import train
    shutil.rmtree(f"{work}/runs", ignore_errors=True)
    cfg = load_config(["configs/default.yaml", "configs/sae/topk.yaml"], [
        f"training.cache={cache_path}", f"training.output_dir={work}/runs", "training.run_name=bench",
        f"training.steps={steps}", "training.device=cpu", "training.verify_reads=true",
        "evaluate.max_tokens=4096", "training.log_every=1000"])
    t0 = time.perf_counter()
    res = train(cfg, say=lambda m: None)
    out["wall_s"] = time.perf_counter() - t0
    out["tokens_per_s"] = res.summary["tokens_per_s"]
    shutil.rmtree(f"{work}/runs", ignore_errors=True)
print("RESULT " + json.dumps(out))
'''


def run(checkout: str, what: str, cache: str, work: str, steps: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, what, cache, work, str(steps)], cwd=checkout,
                          capture_output=True, text=True, check=True)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cache", required=True)
    p.add_argument("--before", required=True, help="a checkout of the code before the change (e.g. main)")
    p.add_argument("--after", default=os.getcwd(), help="this checkout (default: the current folder)")
    p.add_argument("--work", required=True)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--parts", default="open,verify,train", help="comma list of: open, verify, train")
    args = p.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    report: dict = {"note": "2-core machine shared with other helpers' jobs: compare only ratios of this run",
                    "load_average_start": os.getloadavg()}
    checkouts = {"before": args.before, "after": args.after}
    run(args.after, "verify", args.cache, args.work, 0)  # warm the page cache
    for what in args.parts.split(","):
        results: dict[str, list] = {"before": [], "after": []}
        for _ in range(args.reps):
            for name, checkout in checkouts.items():
                results[name].append(run(checkout, what, args.cache, args.work, args.steps))
                print(what, name, results[name][-1], flush=True)
        key = {"open": "open_s", "verify": "verify_s", "train": "wall_s"}[what]
        med = {n: statistics.median(r[key] for r in rs) for n, rs in results.items()}
        entry = {"runs": results, f"median_{key}": med, f"ratio_after_over_before_{key}": med["after"] / med["before"]}
        if what == "train":
            tps = {n: statistics.median(r["tokens_per_s"] for r in rs) for n, rs in results.items()}
            entry["median_tokens_per_s"] = tps
            entry["ratio_after_over_before_tokens_per_s"] = tps["after"] / tps["before"]
        report[what] = entry
    report["load_average_end"] = os.getloadavg()
    print(json.dumps(report, indent=1))
    (Path(args.work) / f"report-{args.parts.replace(',', '-')}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
