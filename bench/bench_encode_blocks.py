"""The TopK encoder with and without its [B, M] pre-activations (results: bench/RESULTS.md, "The heap, and
the encoder GEMM and the top-k in blocks of rows").

    .venv/bin/python bench/bench_encode_blocks.py
    .venv/bin/python bench/bench_encode_blocks.py --latents 3072 --rows 256 1024 --dtypes bfloat16

For each latent count and dtype, one process times (median of --reps, after 2 warm-up calls):
- `whole`: F.linear over the batch (z = x W^T + b, the [B, M] matrix) and the per-row top-k of z
  (`sae.selection.row_topk`, the C kernel where it builds): the encoder that keeps z;
- `R rows`: `sae.selection.encode_topk` with its blocks forced to R rows: the GEMM block by block into
  one reused buffer, each block's top-k (bias added in the kernel) while it is in the cache.
bf16 under CPU autocast, as the trainer runs it. The heap keeps freed memory (native/heap.py), as in
the trainer, so neither side pays for page faults of fresh matrices. Ratios are whole / blocked.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_topk_select import timed  # noqa: E402  (median ms of reps calls after a warm-up)

import sae.selection as selection  # noqa: E402
from native.heap import retain_freed_memory  # noqa: E402


def case(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, k: int, autocast: bool, rows_list: list[int],
         reps: int) -> tuple[float, list[float]]:
    """(whole ms, [blocked ms for each block size])."""
    def whole():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return selection.row_topk(F.linear(x, w, b), k)

    def blocked():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return selection.encode_topk(x, w, b, k)

    base, cells, rule = timed(whole, reps), [], selection.encode_block_rows
    for rows in rows_list:
        selection.encode_block_rows = lambda m, dtype, n, rows=rows: min(rows, n)  # forced, float32 too
        try:
            cells.append(timed(blocked, reps))
        finally:
            selection.encode_block_rows = rule
    return base, cells


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latents", type=int, nargs="+", default=[3072, 12288, 32768])
    p.add_argument("--rows", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=9)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    retain_freed_memory()
    torch.manual_seed(0)
    print(f"TopK encoder, batch {args.batch}, d {args.d}, k {args.k}, {args.threads} threads, "
          f"median of {args.reps}; ms")
    print("| latents | dtype | whole | " + " | ".join(f"{r} rows" for r in args.rows) + " | whole / best blocked |")
    print("|---|---|---|" + "---|" * len(args.rows) + "---|")
    for m in args.latents:
        x, w, b = torch.randn(args.batch, args.d), torch.randn(m, args.d) / 20, torch.randn(m) / 10
        for name in args.dtypes:
            base, cells = case(x, w, b, args.k, name == "bfloat16", args.rows, args.reps)
            print(f"| {m} | {name} | {base:.1f} | " + " | ".join(f"{c:.1f}" for c in cells)
                  + f" | {base / min(cells):.2f} |", flush=True)


if __name__ == "__main__":
    main()
