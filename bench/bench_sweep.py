"""A sweep of 8 TopK members (4 k x 2 learning rates, configs/sweeps/topk-k-lr.yaml) in one pass over
the cache, against the same 8 configs as 8 sequential `make train` runs (`python -m train`, one
process each, as make runs it). Reports, in one run on this machine: whether every member's final
weights equal its solo run's bit for bit, the wall time of each side (each process timed from its
start to its exit) and their ratio, and the cache bytes each side read for batches (the loader's
counter: train_summary.json / sweep_summary.json).

--cold drops the page cache (`sync; echo 3 > /proc/sys/vm/drop_caches`, root only) before each solo
run and before the sweep, so that every pass reads the cache from the disk.

    flock /work/bench.lock .venv/bin/python bench/bench_sweep.py --cache /work/caches/minilm-default --steps 100
    flock /work/bench.lock .venv/bin/python bench/bench_sweep.py --cache /work/caches/minilm-default --steps 100 --cold
    flock /work/bench.lock .venv/bin/python bench/bench_sweep.py --steps 50 --sweep-around   # sweep, 8 solo, sweep
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from train.sweep.spec import load_sweep  # noqa: E402

SWEEP = ROOT / "configs" / "sweeps" / "topk-k-lr.yaml"
PY = sys.executable


def drop_page_cache() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(cmd: list[str], cold: bool) -> float:
    if cold:
        drop_page_cache()
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return seconds


def override(key: str, value: object) -> str:
    return f"{key}={value}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default="/work/caches/minilm-default")
    p.add_argument("--steps", type=int, default=100, help="training.steps of every run")
    p.add_argument("--out", type=Path, default=Path("/work/scratch-sweep/bench"))
    p.add_argument("--cold", action="store_true", help="drop the page cache before every process")
    p.add_argument("--json", type=Path, default=None, help="write the figures here too")
    p.add_argument("--sweep-around", action="store_true",
                   help="run the sweep before and after the solo runs (drift in the machine's load cancels in "
                        "their mean)")
    args = p.parse_args()
    common = [f"training.cache={args.cache}", f"training.steps={args.steps}"]
    sweep = load_sweep(SWEEP, common + [f"training.output_dir={args.out}"], overwrite=True)
    load = os.getloadavg()
    print(f"bench_sweep: {len(sweep.members)} members, {args.steps} steps each, cache {args.cache}, "
          f"{'cold' if args.cold else 'warm'} page cache; load average before {load[0]:.2f}. The machine is "
          "shared: other helpers may have used the CPU during the run; compare the ratios.", flush=True)
    solo_dir = args.out / "solo"
    cmd = [PY, "-m", "train.sweep", str(SWEEP), "--overwrite", *common, f"training.output_dir={args.out}"]
    sweep_runs = []
    if args.sweep_around:
        sweep_runs.append(timed(cmd, args.cold))
        print(f"  sweep (before): {sweep_runs[-1]:.1f} s", flush=True)
    solo_seconds = []
    for m in sweep.members:
        cmd = [PY, "-m", "train", "--model", "topk", "--config", "configs/default.yaml", "--overwrite", *common,
               f"training.output_dir={solo_dir}", f"training.run_name={m.name}",
               *(override(k, v) for k, v in m.variation.items())]
        solo_seconds.append(timed(cmd, args.cold))
        print(f"  solo {m.name}: {solo_seconds[-1]:.1f} s", flush=True)
    sweep_runs.append(timed(cmd, args.cold))
    print(f"  sweep{' (after)' if args.sweep_around else ''}: {sweep_runs[-1]:.1f} s", flush=True)
    sweep_seconds = sum(sweep_runs) / len(sweep_runs)

    equal = {}
    solo_bytes = 0
    for m in sweep.members:
        a = load_file(str(sweep.output_dir / m.name / "sae" / "sae.safetensors"))
        b = load_file(str(solo_dir / m.name / "sae" / "sae.safetensors"))
        equal[m.name] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        solo_bytes += json.loads((solo_dir / m.name / "train_summary.json").read_text())["cache_bytes_read"]
    summary = json.loads((sweep.output_dir / "sweep_summary.json").read_text())
    sweep_bytes = summary["cache_bytes_read"]
    fvu = {r["member"]: (r["heldout_fvu"], r["heldout_l0"]) for r in summary["members"]}
    result = {
        "cache": args.cache, "steps": args.steps, "cold": args.cold, "members": len(sweep.members),
        "bitwise_equal": equal, "solo_seconds": solo_seconds, "solo_total_s": sum(solo_seconds),
        "sweep_s": sweep_seconds, "sweep_runs_s": sweep_runs, "wall_ratio": sweep_seconds / sum(solo_seconds),
        "solo_bytes": solo_bytes, "sweep_bytes": sweep_bytes, "bytes_ratio": sweep_bytes / solo_bytes,
        "heldout": fvu, "load_before": load[0], "load_after": os.getloadavg()[0],
    }
    print(f"every member bitwise equal to its solo run: {all(equal.values())} ({sum(equal.values())}/{len(equal)})")
    print(f"wall: sweep {sweep_seconds:.1f} s (mean of {[round(s, 1) for s in sweep_runs]}), "
          f"8 solo runs {sum(solo_seconds):.1f} s, ratio {result['wall_ratio']:.3f}")
    print(f"cache bytes read: sweep {sweep_bytes / 1e9:.3f} GB, solo runs {solo_bytes / 1e9:.3f} GB, "
          f"ratio {result['bytes_ratio']:.4f}")
    print(f"load average after {result['load_after']:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if all(equal.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
