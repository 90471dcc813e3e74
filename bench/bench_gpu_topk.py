"""TopK training throughput on a GPU as SAE-MFU, through the trainer's own step.

SAE-MFU = (2 * tokens * d * latents per step) / step time / measured bf16 GEMM throughput of the
same GPU, in the same run. The numerator counts the encoder's forward GEMM only (the one dense
product a TopK step cannot avoid); the encoder's weight gradient is a second GEMM of the same size on
the dense path, so a dense-path step that ran at the GEMM ceiling would show 50%.

    python bench/bench_gpu_topk.py --d 2048 --latents 65536 --k 64 --batch 8192 --out gpu_topk.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sae import SAEConfig, get  # noqa: E402
from settings import TrainingConfig  # noqa: E402
from train.loop import Stepper, TrainState, make_optimizer, train_step  # noqa: E402
from train.plan import plan_run  # noqa: E402


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def gemm_tflops(m: int, n: int, k: int, dtype: torch.dtype, device: str, reps: int = 10) -> float:
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * m * n * k * reps / (time.perf_counter() - t0) / 1e12


def bench_impl(impl: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    cfg = SAEConfig(type="TopKSAE", hidden_size=args.d, latent_size=args.latents, k=args.k, decode_impl=impl)
    dev = args.device
    sae = get("topk")(cfg).to(dev)
    t = TrainingConfig(batch_size=args.batch, lr=2e-4, dtype="bfloat16", steps=args.steps + args.warmup,
                       device=dev, compile=args.compile)
    plan = plan_run(t, rows_per_epoch=args.batch * 1000, batches_per_epoch=1000)
    opt = make_optimizer(sae, t)
    stepper = Stepper.from_config(sae, opt, plan, t, torch.device(dev))
    state = TrainState.fresh(args.latents, dev)
    x = torch.randn(args.batch, args.d, device=dev)
    sae.init_from_data(x[:2048])
    for _ in range(args.warmup):
        train_step(stepper, x, state)
    sync(dev)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        train_step(stepper, x, state)
    sync(dev)
    dt = (time.perf_counter() - t0) / args.steps
    flops = 2 * args.batch * args.d * args.latents
    return {"impl": impl, "step_s": dt, "tokens_per_s": args.batch / dt, "encoder_tflops_per_s": flops / dt / 1e12,
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if dev == "cuda" else None,
            "steps_done": state.step}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--d", type=int, default=2048)
    p.add_argument("--latents", type=int, default=65536)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--batch", type=int, default=8192)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--impls", default="dense,sparse")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    n = 8192 if args.device == "cuda" else 1024
    peak = gemm_tflops(n, n, n, torch.bfloat16, args.device)
    enc = gemm_tflops(args.batch, args.latents, args.d, torch.bfloat16, args.device)
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    result = {"gpu": gpu, "torch": torch.__version__, "args": vars(args),
              "bf16_gemm_tflops_square": peak, "bf16_gemm_tflops_encoder_shape": enc, "runs": []}
    for impl in args.impls.split(","):
        r = bench_impl(impl, args)
        r["sae_mfu"] = r["encoder_tflops_per_s"] / peak
        result["runs"].append(r)
        print(json.dumps(r), flush=True)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
