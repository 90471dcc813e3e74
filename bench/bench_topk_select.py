"""Per-row top-k selection of the TopK step on the CPU: the alternatives side by side (bench/RESULTS.md,
"Top-k selection").

    .venv/bin/python bench/bench_topk_select.py                 # [4096, 3072] and [4096, 12288], k 32
    .venv/bin/python bench/bench_topk_select.py --latents 256 --batch 64 --k 4 --reps 2   # smoke run

On pre-activations of the step's shape (random encoder, Gaussian rows), in float32 and bf16 (the
compute dtype under `training.dtype=bfloat16`), median of `--reps` calls after one warm-up:
- `topk`: `torch.topk(k, sorted=False)` over the whole row (what the step used before the strided one);
- `strided<w>`: the top-k blocks of w strided columns by their maxima, then a top-k among their
  k * w entries (sae.selection.strided_block_topk);
- `native (width)`: the C kernel, the same strided search row by row (sae.native.row_topk), and the
  block width it picks (sae.native.block_width);
- `row_topk`: what the step uses (sae.selection.row_topk: the C kernel where it builds, else strided
  with `strided_width`'s width on the CPU for wide rows, torch.topk otherwise);
- `blocked<n>`: a top-k in each of n column blocks, then among the n*k candidates
  (sae.selection.blocked_topk_indices);
- `threshold mask pass`: only the masked pass of "a threshold from a strided 1/8 sample, then keep what
  is above it" (the selection itself would still need a compaction and a top-k among the survivors, so
  this is a lower bound of its cost);
- `compiled topk`: `torch.compile` of the selection alone;
- `max`: one reduction pass over the matrix, the floor any selection pays.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sae import native  # noqa: E402
from sae.selection import blocked_topk_indices, row_topk, strided_block_topk  # noqa: E402


def timed(fn: Any, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def threshold_mask_pass(z: torch.Tensor, k: int, stride: int = 8) -> torch.Tensor:
    sample = z[:, ::stride]
    cut = sample.topk(max(1, k // stride), dim=1).values[:, -1:]
    return (z >= cut).sum(dim=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latents", type=int, nargs="+", default=[3072, 12288])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    k = args.k
    compiled = None if args.no_compile else torch.compile(lambda z: z.topk(k, dim=1, sorted=False), dynamic=False)
    widths = (4, 8, 16, 32)
    print(f"load average at start {os.getloadavg()[0]:.1f}; ms per call, median of {args.reps}")
    if native.library() is None:
        print("sae.native: no C kernel on this machine (the native column is empty)")
    print("| latents | dtype | topk | " + " | ".join(f"strided{w}" for w in widths) + " | native (width) | row_topk "
          "| blocked4 | blocked8 | blocked16 | threshold mask pass | compiled topk | max |")
    print("|---|---|---|" + "---|" * len(widths) + "---|---|---|---|---|---|---|---|")
    for m in args.latents:
        torch.manual_seed(0)
        z32 = torch.randn(args.batch, args.d) @ (torch.randn(m, args.d) / args.d**0.5).T
        for dtype in (torch.float32, torch.bfloat16):
            z = z32.to(dtype)
            row = [timed(lambda z=z: z.topk(k, dim=1, sorted=False), args.reps)]
            for w in widths:
                ok = m % w == 0 and m // w >= k
                row.append(timed(lambda z=z, w=w: strided_block_topk(z, k, w), args.reps) if ok else float("nan"))
            has_native = native.library() is not None
            own = timed(lambda z=z: native.row_topk(z, k), args.reps) if has_native else float("nan")
            kept = timed(lambda z=z: row_topk(z, k), args.reps)
            for blocks in (4, 8, 16):
                ok = m % blocks == 0 and m // blocks >= k
                fn = lambda z=z, b=blocks: blocked_topk_indices(z, k, b)  # noqa: E731
                row.append(timed(fn, args.reps) if ok else float("nan"))
            row.append(timed(lambda z=z: threshold_mask_pass(z, k), args.reps))
            row.append(timed(lambda z=z: compiled(z), args.reps) if compiled is not None else float("nan"))
            row.append(timed(lambda z=z: z.max(dim=1), args.reps))
            cells = [f"{v:.1f}" for v in row]
            cells.insert(1 + len(widths), f"{own:.1f} ({native.block_width(m, k)})")
            cells.insert(2 + len(widths), f"{kept:.1f}")
            print(f"| {m} | {str(dtype).removeprefix('torch.')} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
