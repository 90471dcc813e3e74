"""Scaling of data-parallel SAE training on this machine: 2 processes (gloo) against 1.

TopK d=384, d_sae=3072, k=32, global batch 4096, float32, random in-memory batches (the loader is
left out: this measures the step and its reductions). The 1-process baseline is the faster of 1 and 2
threads (on a shared, loaded machine 2 threads can lose); each rank uses 1 thread. Reported: steps/s
at the same global batch, the speed-up and the scaling efficiency = speed-up / 2, and the cost of one
gradient all-reduce (one flat buffer of all parameters, timed alone) as a share of the 2-process step.

    .venv/bin/python bench/bench_ddp.py [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

D, D_SAE, K, BATCH = 384, 3072, 32, 4096


def _stepper(dp, batch: int):
    from sae import SAEConfig
    from sae.topk import TopKSAE
    from train.loop import Stepper, TrainState

    sae = TopKSAE(SAEConfig(type="TopKSAE", hidden_size=D, latent_size=D_SAE, k=K))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)

    class Plan:  # the parts of RunPlan train_step reads
        class lr:  # noqa: N801
            @staticmethod
            def factor(step: int) -> float:
                return 1.0
        dead_threshold_tokens = 10_000_000
        sparsity_warmup_steps = 0
        threshold_start_step = 0

    s = Stepper(sae=sae, optimizer=opt, plan=Plan, lr=1e-4, forward_kwargs={"dense_acts": False}, dp=dp)
    return s, TrainState.fresh(D_SAE)


def measure(dp, steps: int) -> dict:
    from train.loop import train_step

    rank = dp.rank if dp else 0
    local = BATCH // (dp.world if dp else 1)
    g = torch.Generator().manual_seed(rank)
    xs = [torch.randn(local, D, generator=g) for _ in range(4)]
    s, state = _stepper(dp, local)
    for i in range(3):
        train_step(s, xs[i % 4], state)
    if dp:
        dp.barrier()
    t0 = time.perf_counter()
    for i in range(steps):
        train_step(s, xs[i % 4], state)
    if dp:
        dp.barrier()
    step_s = (time.perf_counter() - t0) / steps
    out = {"step_s": step_s, "steps_per_s": 1 / step_s}
    if dp:
        for p in s.sae.parameters():
            p.grad = torch.randn_like(p)
        dp.barrier()
        t0 = time.perf_counter()
        for _ in range(steps):
            dp.reduce_grads(s.sae)
        dp.barrier()
        out["allreduce_s"] = (time.perf_counter() - t0) / steps
        out["allreduce_mb"] = sum(p.numel() for p in s.sae.parameters()) * 4 / 1e6
    return out


def _worker(steps: int, out_file: str) -> None:
    from train.distributed import DataParallel

    torch.set_num_threads(1)
    dp = DataParallel.start(torch.device("cpu"))
    res = measure(dp, steps)
    if dp.is_main:
        Path(out_file).write_text(json.dumps(res))
    dp.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--worker", default=None)
    args = ap.parse_args()
    if args.worker:
        _worker(args.steps, args.worker)
        return
    ones = {}
    for threads in (1, 2):  # on a loaded machine 2 threads can be slower than 1: the faster is the baseline
        torch.set_num_threads(threads)
        ones[threads] = measure(None, args.steps)
    one = min(ones.values(), key=lambda r: r["step_s"])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "two.json"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        __file__, "--steps", str(args.steps), "--worker", str(out)], check=True, env=env, cwd=ROOT)
        two = json.loads(out.read_text())
    speedup = two["steps_per_s"] / one["steps_per_s"]
    print(json.dumps({"one_process_by_threads": ones, "two_processes": two, "speedup": speedup,
                      "scaling_efficiency": speedup / 2,
                      "allreduce_share_of_step": two["allreduce_s"] / two["step_s"]}, indent=1))


if __name__ == "__main__":
    main()
