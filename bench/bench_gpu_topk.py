"""The TopK step on a GPU in one call: our trainer's step at the large size beside sparsify's Triton path,
and the small, launch-bound step with and without a CUDA graph (bench/RESULTS.md, "Training step on CUDA").

    python bench/bench_gpu_topk.py --out gpu_topk.json                 # the device check, one call
    python bench/bench_gpu_topk.py --device cpu --d 32 --latents 256 --k 4 --batch 128 --small-d 16 \\
        --small-latents 64 --small-k 4 --small-batch 64 --steps 2 --warmup 1     # rehearsal (tests)

1. Large: TopK d 2048, 65,536 latents, k 64, batch 4096, `training.dtype=bfloat16` (bf16 matmuls,
   float32 master weights), through `train.loop.train_step` exactly as `run_loop` calls it, on random
   rows: tokens/s and SAE-MFU = 2*B*d*M / step time / the best GEMM of that shape measured in the same
   run (bf16 and float32 `mm`; the encoder GEMM is the one dense product a TopK step needs).
2. sparsify's `SparseCoder` at the same size and dtype (bf16 autocast, its own step: unit decoder,
   forward returning FVU, backward, parallel-gradient removal, Adam), with its Triton decoder where
   triton imports (the path its CUDA users get), else its eager one; `sparsify: not installed` when the
   package is absent (carry its wheel: `pip download eai-sparsify==1.3.3 --no-deps`).
3. Small: d 384, 3072 latents, k 32, batch 4096 (the CPU figures' size), eager, then the same step
   captured once in a CUDA graph and replayed (fused capturable Adam, the GPU's fixed-shape AuxK); on a
   CPU the graph row says `n/a`. A graph replays what was captured: the lr and the step count are
   frozen at capture, which is fine for a throughput figure and is why the trainer does not use it yet.
4. Selection alone, at both sizes, on pre-activations in the compute dtype: `torch.topk` over the row
   against `sae.selection.strided_block_topk` at the width the CPU rule picks and at its neighbours
   (exactness checked against torch.topk's values), ms per call. The trainer keeps `torch.topk` on CUDA
   until this says otherwise.

Every part that fails records its error in the JSON and the others still run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sae import SAEConfig, get  # noqa: E402
from sae.selection import strided_block_topk, strided_width  # noqa: E402
from settings import TrainingConfig  # noqa: E402
from train.loop import Stepper, TrainState, make_optimizer, train_step  # noqa: E402
from train.plan import plan_run  # noqa: E402
from train.precision import bf16_autocast_available  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Any, device: torch.device, steps: int, warmup: int) -> float:
    """Seconds per call, after warm-up (one synchronisation at each end: launches overlap as in training)."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / steps


def best_gemm(b: int, d: int, m: int, device: torch.device, reps: int = 5) -> dict[str, float]:
    """FLOP/s of [b, d] x [d, m] per kernel; bf16 only where it is native."""
    x, w = torch.randn(b, d, device=device), torch.randn(m, d, device=device)
    kernels = {"float32 mm": (x, w)}
    if bf16_autocast_available(device):
        kernels["bfloat16 mm"] = (x.bfloat16(), w.bfloat16())
    out = {}
    for name, (a, bt) in kernels.items():
        out[name] = 2.0 * b * d * m / timed(lambda a=a, bt=bt: a @ bt.T, device, reps, 2)
    return out


def _stepper(d: int, m: int, k: int, batch: int, device: torch.device, dtype: str,
             capturable: bool = False) -> tuple[Stepper, TrainState, torch.Tensor]:
    torch.manual_seed(0)
    sae = get("topk")(SAEConfig(type="topk", hidden_size=d, latent_size=m, k=k)).to(device)
    t = TrainingConfig(batch_size=batch, lr=2e-4, dtype=dtype, steps=10**6, log_every=10**6)
    plan = plan_run(t, rows_per_epoch=batch * 1000, batches_per_epoch=1000)
    opt = make_optimizer(sae, t)
    if capturable:  # a graph replays device work only: Adam's step count must live on the device
        opt = torch.optim.Adam(sae.parameters(), lr=t.lr, betas=(t.betas[0], t.betas[1]), eps=t.eps,
                               fused=True, capturable=True)
    x = torch.randn(batch, d, device=device)
    sae.init_from_data(x[:2048])
    return Stepper.from_config(sae, opt, plan, t, device), TrainState.fresh(m, device), x


def ours(d: int, m: int, k: int, batch: int, device: torch.device, dtype: str, steps: int, warmup: int) -> dict:
    stepper, state, x = _stepper(d, m, k, batch, device, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    dt = timed(lambda: train_step(stepper, x, state), device, steps, warmup)
    return {"step_s": dt, "tokens_per_s": batch / dt, "dtype_used": stepper.dtype,
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None}


def ours_graph(d: int, m: int, k: int, batch: int, device: torch.device, dtype: str, steps: int,
               warmup: int) -> dict:
    if device.type != "cuda":
        return {"skipped": "n/a on cpu (CUDA graphs)"}
    stepper, state, x = _stepper(d, m, k, batch, device, dtype, capturable=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph (allocator, autotuning), as the docs ask
        for _ in range(3):
            train_step(stepper, x, state)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        train_step(stepper, x, state)
    dt = timed(graph.replay, device, steps, warmup)
    return {"step_s": dt, "tokens_per_s": batch / dt, "dtype_used": stepper.dtype}


def sparsify(d: int, m: int, k: int, batch: int, device: torch.device, dtype: str, steps: int,
             warmup: int) -> dict:
    try:
        from importlib.metadata import version

        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError as e:
        return {"skipped": f"sparsify: not installed ({e})"}
    try:
        import triton  # noqa: F401

        triton_ok = device.type == "cuda"
    except ImportError:
        triton_ok = False
    torch.manual_seed(0)
    coder = SparseCoder(d, SparseCoderConfig(num_latents=m, k=k), device=device, dtype=torch.float32)
    opt = torch.optim.Adam(coder.parameters(), lr=2e-4, fused=device.type in ("cuda", "cpu"))
    x = torch.randn(batch, d, device=device)
    bf16 = dtype == "bfloat16" and bf16_autocast_available(device)

    def step() -> None:
        coder.set_decoder_norm_to_unit_norm()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = coder(x)
        out.fvu.backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)

    dt = timed(step, device, steps, warmup)
    return {"step_s": dt, "tokens_per_s": batch / dt, "version": version("eai-sparsify"),
            "decoder": "triton" if triton_ok else "eager", "autocast_bf16": bf16}


def selection(m: int, k: int, batch: int, device: torch.device, dtype: str, steps: int, warmup: int) -> dict:
    """ms per call of torch.topk and of the strided selection on [batch, m] pre-activations."""
    dt = torch.bfloat16 if dtype == "bfloat16" and bf16_autocast_available(device) else torch.float32
    torch.manual_seed(0)
    z = torch.randn(batch, m, device=device).to(dt)
    ref = z.topk(k, dim=1).values
    out: dict[str, Any] = {"dtype": str(dt).removeprefix("torch."),
                           "topk_ms": 1e3 * timed(lambda: z.topk(k, dim=1, sorted=False), device, steps, warmup)}
    rule = strided_width(m, k)
    widths = sorted({w for w in ((rule // 2, rule, rule * 2) if rule else (2, 4, 8))
                     if w > 1 and m % w == 0 and m // w >= k})
    out["cpu_rule_width"] = rule
    for w in widths:
        values, _ = strided_block_topk(z, k, w)
        exact = torch.equal(values.sort(dim=1, descending=True).values, ref)
        ms = 1e3 * timed(lambda w=w: strided_block_topk(z, k, w), device, steps, warmup)
        out[f"strided{w}"] = {"ms": ms, "exact": exact, "topk_over_strided": out["topk_ms"] / ms}
    return out


def guarded(name: str, fn: Any, *args: Any) -> dict:
    try:
        return fn(*args)
    except Exception as e:  # one part failing must not cost the device call its other figures
        return {"error": f"{name}: {type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=2048)
    p.add_argument("--latents", type=int, default=65536)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--small-d", type=int, default=384)
    p.add_argument("--small-latents", type=int, default=3072)
    p.add_argument("--small-k", type=int, default=32)
    p.add_argument("--small-batch", type=int, default=4096)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
        "args": vars(args), "bf16_native": bf16_autocast_available(device),
    }
    large = (args.d, args.latents, args.k, args.batch, device, args.dtype, args.steps, args.warmup)
    small = (args.small_d, args.small_latents, args.small_k, args.small_batch, device, args.dtype, args.steps,
             args.warmup)
    gemm = best_gemm(args.batch, args.d, args.latents, device)
    result["large"] = {"gemm_flops": gemm, "best_gemm": max(gemm, key=lambda n: gemm[n]),
                       "ours": guarded("ours", ours, *large), "sparsify": guarded("sparsify", sparsify, *large)}
    flop = 2.0 * args.batch * args.d * args.latents
    for row in ("ours", "sparsify"):
        r = result["large"][row]
        if "step_s" in r:
            r["sae_mfu_best_gemm"] = flop / r["step_s"] / max(gemm.values())
    if "tokens_per_s" in result["large"]["ours"] and "tokens_per_s" in result["large"]["sparsify"]:
        result["large"]["ours_over_sparsify"] = (result["large"]["ours"]["tokens_per_s"]
                                                 / result["large"]["sparsify"]["tokens_per_s"])
    result["small"] = {"eager": guarded("small eager", ours, *small),
                       "cuda_graph": guarded("small graph", ours_graph, *small)}
    if "step_s" in result["small"]["cuda_graph"]:
        result["small"]["graph_speedup"] = result["small"]["eager"]["step_s"] / result["small"]["cuda_graph"]["step_s"]
    result["selection"] = {
        "large": guarded("selection large", selection, args.latents, args.k, args.batch, device, args.dtype,
                         args.steps, args.warmup),
        "small": guarded("selection small", selection, args.small_latents, args.small_k, args.small_batch, device,
                         args.dtype, args.steps, args.warmup)}
    result["errors"] = [r["error"] for part in ("large", "small", "selection") for r in result[part].values()
                        if isinstance(r, dict) and "error" in r]
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
