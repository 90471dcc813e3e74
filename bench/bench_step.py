"""The trainer's own step (`train.loop.train_step`), phase by phase, and SAE-MFU against the best GEMM.

    .venv/bin/python bench/bench_step.py                                   # TopK d 384, k 32, 4096 tokens
    .venv/bin/python bench/bench_step.py --latents-list 3072 --dtypes float32 bfloat16 --code /tmp/base
    .venv/bin/python bench/bench_step.py --latents-list 256 --d 32 --k 4 --batch 128 --steps 2 --warmup 1

Each (code, latents, dtype) runs in a fresh subprocess. `--code DIR ...` times the step of other
checkouts of this project (e.g. `git archive main` unpacked into DIR) in the same run, so that a
before/after comparison is side by side. A step is exactly what `run_loop` calls: `train_step` on a
`Stepper.from_config` (lr schedule, forward, loss, backward, clipping, Adam, decoder renormalisation,
threshold and dead-latent bookkeeping), on random Gaussian rows (the step's cost does not depend on
the data; no latent is dead, so AuxK does not run). Times: median wall time of the timed steps.

Phases come from one profiled pass over `--profile-steps` steps (torch.profiler, CPU activities), by
the top-level events of the training thread in time order: everything before the first autograd event
is the forward and loss, split into the encoder GEMM (aten::linear/addmm/mm), the top-k selection
(aten::topk and the selection's own ops, the strided selection's block maxima and gathers and the C
kernel of sae.native included)
and the rest; autograd events are the backward; what follows
up to the optimiser is gradient surgery and clipping; `Optimizer.step` is Adam; what follows it is
renormalisation and bookkeeping. Shares are of the profiled step (the profiler's own overhead is in
all phases alike). The same pass counts the ops that would synchronise host and device on a GPU
(`aten::_local_scalar_dense`: .item(), int(), bool() of a tensor; `aten::nonzero`: boolean masks).

SAE-MFU = 2*B*d*M (the encoder GEMM, the one dense GEMM a TopK step needs) / (step time x GEMM
FLOP/s), with two denominators measured in the same run on the step's shape [B, d] x [d, M]:
- `fp32` (the definition bench/RESULTS.md used before): F.linear in float32;
- `best`: the fastest GEMM kernel this machine offers for that shape, the best of float32 and (where
  bf16 is native) bf16 `mm` / `addmm` (into a preallocated result) / `F.linear`, and of the same `mm`
  over blocks of 256 or 1024 rows into one reused output block (`by R rows`): that is how the fused
  CPU encoder runs its bf16 GEMM (`sae.selection.encode_topk`), and at 12,288 latents it is faster
  than a GEMM that writes the whole [B, M] result to memory, so leaving it out would flatter the step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

GEMM_OPS = {"aten::linear", "aten::addmm", "aten::mm", "aten::matmul"}
# the selection's ops; amax and gather are the strided top-k's (sae.selection.strided_block_topk), and
# sae::row_topk the C kernel's (sae.native.row_topk): before the backward nothing else in a TopK forward
# calls them
SELECT_OPS = {"aten::topk", "aten::repeat_interleave", "aten::arange", "aten::sort", "aten::bincount",
              "aten::amax", "aten::gather", "sae::row_topk"}


def phase_split(events: list, n_steps: int) -> dict[str, float]:
    """Top-level profiler events of the training thread -> ms per step in each phase."""
    tops = sorted((e for e in events if e.cpu_parent is None), key=lambda e: e.time_range.start)
    phases = {k: 0.0 for k in ("gemm", "select", "forward_rest", "backward", "clip", "adam", "after")}
    seen_backward = seen_adam = False
    for e in tops:
        ms = (e.time_range.end - e.time_range.start) / 1e3
        name = e.name
        if name.startswith("Optimizer.step") or name.startswith("Optimizer.zero_grad"):
            if name.startswith("Optimizer.step"):
                phases["adam"] += ms
                seen_adam = True
            continue
        if name.startswith("autograd::engine") or name.startswith("torch::autograd"):
            phases["backward"] += ms
            seen_backward = True
            continue
        if name == "## step ##":  # step boundary marker
            seen_backward = seen_adam = False
            continue
        if seen_adam:
            phases["after"] += ms
        elif seen_backward:
            phases["clip"] += ms
        elif name in GEMM_OPS:
            phases["gemm"] += ms
        elif name in SELECT_OPS:
            phases["select"] += ms
        else:
            phases["forward_rest"] += ms
    return {k: v / n_steps for k, v in phases.items()}


def worker(args: argparse.Namespace) -> dict:
    sys.path.insert(0, args.code)
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    import sae as zoo
    from settings import TrainingConfig
    from train.loop import Stepper, TrainState, make_optimizer, train_step
    from train.plan import plan_run

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    batches = [torch.randn(args.batch, args.d, device=dev) for _ in range(2)]
    cfg = zoo.SAEConfig(type=args.type, hidden_size=args.d, latent_size=args.latents, k=args.k)
    model = zoo.get(args.type)(cfg).to(dev)
    t = TrainingConfig(batch_size=args.batch, steps=10**6, lr=2e-3, dtype=args.dtype, log_every=10**6)
    plan = plan_run(t, args.batch * 1000, 1000)
    stepper = Stepper.from_config(model, make_optimizer(model, t), plan, t, dev)
    state = TrainState.fresh(args.latents, dev)
    times = []
    for i in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        train_step(stepper, batches[i % 2], state)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(args.profile_steps):
            with record_function("## step ##"):
                pass
            train_step(stepper, batches[i % 2], state)
    events = list(prof.events())
    main_thread = statistics.mode(e.thread for e in events if e.cpu_parent is None)
    events = [e for e in events if e.thread == main_thread]
    counts = {name: sum(1 for e in events if e.name == name) / args.profile_steps
              for name in ("aten::_local_scalar_dense", "aten::nonzero")}
    return {"code": args.code, "latents": args.latents, "dtype": args.dtype,
            "used": getattr(stepper, "dtype", "bfloat16" if args.dtype == "bfloat16" else "float32"),
            "step_s": statistics.median(times), "min_step_s": min(times),
            "phases_ms": phase_split(events, args.profile_steps), "syncs_per_step": counts}


def gemm_flops(args: argparse.Namespace, latents: int, reps: int = 10) -> dict[str, float]:
    """FLOP/s of [B, d] x [d, M] for each kernel the machine offers (bf16 only where native)."""
    sys.path.insert(0, str(ROOT))
    import torch
    import torch.nn.functional as F

    from native.heap import retain_freed_memory
    from train.precision import bf16_autocast_available

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    x, w, b = (torch.randn(args.batch, args.d, device=dev), torch.randn(latents, args.d, device=dev),
               torch.randn(latents, device=dev))
    def by_rows(a, w_t, rows):
        block = torch.empty(min(rows, a.shape[0]), w_t.shape[1], dtype=a.dtype, device=a.device)
        return lambda: [torch.mm(a[r:r + rows], w_t, out=block[: a[r:r + rows].shape[0]])
                        for r in range(0, a.shape[0], rows)]

    # The whole-matrix kernels write into a preallocated result (F.linear, which has no out=, in a heap
    # that keeps freed memory): what is timed is the kernel, not the page faults of a fresh [B, M] matrix.
    retain_freed_memory()
    o32 = torch.empty(args.batch, latents, device=dev)
    kernels = {"fp32 F.linear": lambda: F.linear(x, w, b), "fp32 mm": lambda: torch.mm(x, w.T, out=o32)}
    kernels.update({f"fp32 mm by {r} rows": by_rows(x, w.T, r) for r in (256, 1024)})
    if bf16_autocast_available(dev):
        xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
        o16 = o32.bfloat16()
        kernels.update({"bf16 F.linear": lambda: F.linear(xb, wb, bb),
                        "bf16 mm": lambda: torch.mm(xb, wb.T, out=o16),
                        "bf16 addmm": lambda: torch.addmm(bb, xb, wb.T, out=o16)})
        kernels.update({f"bf16 mm by {r} rows": by_rows(xb, wb.T, r) for r in (256, 1024)})
    out = {}
    for name, fn in kernels.items():
        fn()
        times = []
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        out[name] = 2.0 * args.batch * args.d * latents / statistics.median(times)
    return out


def run_worker(args: argparse.Namespace, code: str, latents: int, dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--code", code, "--latents-list", str(latents), "--dtypes", dtype,
           "--d", str(args.d), "--k", str(args.k), "--batch", str(args.batch), "--threads", str(args.threads),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--profile-steps", str(args.profile_steps),
           "--device", args.device, "--type", args.type]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"worker {code} {latents} {dtype} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(args: argparse.Namespace, results: list[dict], gemms: dict[int, dict[str, float]]) -> str:
    b, d = args.batch, args.d
    lines = [f"{args.type} on {args.device}: d_in {d}, k {args.k}, batch {b}, {args.threads} threads, median of "
             f"{args.steps} steps after {args.warmup} warm-up; phases from {args.profile_steps} profiled steps. "
             f"Machine possibly shared with other jobs (load average at start {os.getloadavg()[0]:.1f}): "
             "compare figures of this run only.", ""]
    for m, g in gemms.items():
        best = max(g, key=lambda k: g[k])
        lines.append(f"GEMM [{b}x{d}]x[{d}x{m}] GFLOP/s: " + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in g.items())
                     + f"; best: {best}")
    lines += ["", "| code | latents | dtype (used) | step ms | tokens/s | SAE-MFU fp32 | SAE-MFU best "
              "| GEMM | top-k | forward rest | backward | clip | Adam | after | syncs/step |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        m, g = r["latents"], gemms[r["latents"]]
        flop = 2 * b * d * m
        p = r["phases_ms"]
        syncs = r["syncs_per_step"]
        lines.append(
            f"| {Path(r['code']).name} | {m} | {r['dtype']} ({r['used']}) | {r['step_s'] * 1e3:.1f} "
            f"| {b / r['step_s']:,.0f} | {flop / r['step_s'] / g['fp32 F.linear']:.2f} "
            f"| {flop / r['step_s'] / max(g.values()):.2f} | "
            + " | ".join(f"{p[k]:.1f}" for k in ("gemm", "select", "forward_rest", "backward", "clip", "adam", "after"))
            + f" | {syncs['aten::_local_scalar_dense']:.0f} item, {syncs['aten::nonzero']:.0f} nonzero |")
    lines.append("\nPhases in ms per profiled step (see the module docstring for what each holds).")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latents-list", type=int, nargs="+", default=[3072, 12288])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--code", nargs="+", default=[str(ROOT)], help="project checkouts to time (default: this one)")
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--type", default="topk", help="the SAE whose step is timed (TopK family)")
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.latents, args.dtype, args.code = args.latents_list[0], args.dtypes[0], args.code[0]
        print(json.dumps(worker(args)))
        return
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    results = []
    for m in args.latents_list:
        for dtype in args.dtypes:
            for code in args.code:  # interleaved: a busy spell of the machine hits every checkout alike
                results.append(run_worker(args, str(Path(code).resolve()), m, dtype))
                print(json.dumps(results[-1]), file=sys.stderr)
    gemms = {m: gemm_flops(args, m) for m in args.latents_list}
    text = report(args, results, gemms)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "gemm_flops": gemms}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
