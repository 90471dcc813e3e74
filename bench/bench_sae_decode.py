"""TopK SAE training step: sparse (embedding_bag) vs dense (GEMM) decode, time and peak memory.

    .venv/bin/python bench/bench_sae_decode.py            # d 384, latents 3072 and 12288, k 32, 4096 tokens
    .venv/bin/python bench/bench_sae_decode.py --type batchtopk --latents-list 3072
    .venv/bin/python bench/bench_sae_decode.py --latents-list 1024 --d 64 --k 4 --batch 256 --threads 1

Each (latents, impl) runs in a fresh subprocess so that its RSS high-water mark (ru_maxrss) is its
own. A step is what the trainer does: forward (dense_acts=False), loss (plain MSE; no dead latents,
so AuxK costs nothing), backward, parallel-gradient removal, Adam, decoder renormalisation, and
the fired-latent mask. Times are the median of the timed steps, after warm-up.

FLOP counts (B tokens, d inputs, M latents; one GEMM of that shape = 2*B*d*M FLOP):
- SAE-MFU (DESIGN.md): 2*B*d*M per step, the encoder forward, the one dense GEMM a TopK step
  cannot avoid, over (step time x this machine's fp32 GEMM FLOP/s measured here on
  [B, d] x [d, M] via F.linear, the encoder's own call). 100% = the step costs only its encoder GEMM.
- Executed FLOP: the dense step runs 6 such GEMMs (encoder forward; encoder backward to W_enc and
  to the input, which b_dec needs; decoder forward; decoder backward to W_dec and to the latents),
  12*B*d*M; the sparse step runs 1 plus about 10*B*k*d of gathers and scatters.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB


def worker(args: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from sae import SAEConfig, get

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    batches = [torch.randn(args.batch, args.d, device=dev) for _ in range(2)]
    base_rss = rss_mb()
    cfg = SAEConfig(type=args.type, hidden_size=args.d, latent_size=args.latents, k=args.k, decode_impl=args.impl)
    model = get(args.type)(cfg).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=4e-4)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step(x: torch.Tensor) -> list[float]:
        """One training step -> cumulative times after forward+loss, backward, optimiser+rest."""
        t0 = time.perf_counter()
        out = model(x, dense_acts=False)
        loss = model.loss(out)["total"]
        sync()
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sync()
        t2 = time.perf_counter()
        model.remove_parallel_grads()
        opt.step()
        model.normalize_decoder()
        model.fired(out)
        sync()
        return [t1 - t0, t2 - t1, time.perf_counter() - t2]

    phases = []
    for i in range(args.warmup + args.steps):
        sync()
        p = step(batches[i % 2])
        if i >= args.warmup:
            phases.append(p)
    times = [sum(p) for p in phases]
    result = {"latents": args.latents, "impl": args.impl, "step_s": statistics.median(times),
              "min_step_s": min(times), "peak_rss_mb": rss_mb(), "base_rss_mb": base_rss,
              "phases_s": [statistics.median(col) for col in zip(*phases, strict=True)]}
    if dev.type == "cuda":  # on a GPU the memory that matters is the device's
        result["peak_rss_mb"], result["base_rss_mb"] = torch.cuda.max_memory_allocated() / 2**20, 0.0
    return result


def gemm_flops(args: argparse.Namespace, latents: int, reps: int = 15) -> float:
    """fp32 FLOP/s of the encoder's GEMM shape: F.linear([B, d], [M, d])."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    x, w = torch.randn(args.batch, args.d, device=dev), torch.randn(latents, args.d, device=dev)
    F.linear(x, w)
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        F.linear(x, w)
        sync()
        times.append(time.perf_counter() - t0)
    return 2.0 * args.batch * args.d * latents / statistics.median(times)


def run_worker(args: argparse.Namespace, latents: int, impl: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--latents", str(latents), "--impl", impl,
           "--d", str(args.d), "--k", str(args.k), "--batch", str(args.batch), "--threads", str(args.threads),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device, "--type", args.type]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(args: argparse.Namespace, results: list[dict], peak: dict[int, float]) -> str:
    b, d, k = args.batch, args.d, args.k
    lines = [
        f"{args.type} on {args.device}: d_in {d}, k {k}, batch {b} tokens, fp32, {args.threads} threads, "
        f"median of {args.steps} steps "
        f"after {args.warmup} warm-up; fp32 GEMM [{b}x{d}]x[{d}xM] measured in the same run.",
        "",
        f"| latents | impl | step ms | tokens/s | sparse speed-up | peak {'GPU' if args.device != 'cpu' else 'RSS'} MB "
        "| over baseline MB "
        "| executed GFLOP/step | GEMM GFLOP/s | SAE-MFU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["latents"], r["impl"]): r for r in results}
    for m in args.latents_list:
        dense_t = by[(m, "dense")]["step_s"]
        for impl in ("dense", "sparse"):
            r = by[(m, impl)]
            executed = 12 * b * d * m if impl == "dense" else 2 * b * d * m + 10 * b * k * d
            mfu = 2 * b * d * m / r["step_s"] / peak[m]
            speedup = f"{dense_t / r['step_s']:.2f}x" if impl == "sparse" else "1 (baseline)"
            lines.append(
                f"| {m} | {impl} | {r['step_s'] * 1e3:.0f} | {b / r['step_s']:,.0f} | {speedup} "
                f"| {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - r['base_rss_mb']:.0f} | {executed / 1e9:.3g} "
                f"| {peak[m] / 1e9:.0f} | {100 * mfu:.1f}% |"
            )
    lines.append("\nPhases (median ms): forward+loss / backward / Adam + decoder renormalisation + fired mask")
    for r in results:
        f, bw, o = (1e3 * t for t in r["phases_s"])
        lines.append(f"- {r['latents']} {r['impl']}: {f:.0f} / {bw:.0f} / {o:.0f}")
    for m in args.latents_list:
        s, dn = by[(m, "sparse")], by[(m, "dense")]
        lines.append(
            f"\nlatents {m}: sparse/dense step time {s['step_s'] / dn['step_s']:.2f}, "
            f"peak RSS {s['peak_rss_mb'] / dn['peak_rss_mb']:.2f}, "
            f"RSS over baseline {(s['peak_rss_mb'] - s['base_rss_mb']) / (dn['peak_rss_mb'] - dn['base_rss_mb']):.2f}"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latents-list", type=int, nargs="+", default=[3072, 12288])
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu (the default and the reported figures) or cuda")
    p.add_argument("--type", default="topk", choices=["topk", "batchtopk"], help="the SAE whose step is timed")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--latents", type=int, help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    results = []
    for m in args.latents_list:
        for impl in ("dense", "sparse"):
            results.append(run_worker(args, m, impl))
            print(json.dumps(results[-1]), file=sys.stderr)
    peak = {m: gemm_flops(args, m) for m in args.latents_list}
    print(report(args, results, peak))


if __name__ == "__main__":
    main()
