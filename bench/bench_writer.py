"""Stage 1 at the speed of the disk (results: bench/RESULTS.md, "Cache writer"). Three figures, one run:

1. grid: the CacheWriter (async, defaults: statistics, xxh3, fsync, in-order commits) against
   `safetensors.torch.save_file` + fsync of the same shards, for 1, 6 and 30 layers of width 384 in
   float32 and bfloat16. Goal: ratio (save_file time / CacheWriter time) >= 0.9.
2. synthetic: a harvest whose producer makes rows as fast as a GPU would, with no model (windows
   planned from synthetic sequences as the harvest plans them; each window's rows are slices of a
   random bfloat16 bank of the Qwen3-1.7B shape, 2048 wide, 28 blocks), through the harvest's own
   hand-off (`WindowSink`) into the CacheWriter, against save_file + fsync of shards of the same
   shapes: the disk's own bandwidth for those bytes. Goal >= 0.9.
3. minilm: the default harvest (all-MiniLM-L6-v2, all 6 layers, float32, CPU) against its bare
   forward to the same depth over the same batches. Goal >= 0.95.
4. int8 (--only int8; issue 14): the synthetic harvest of 2. (rows as fast as a GPU makes them, bfloat16,
   through WindowSink) written as the 8-bit dtype `int8` against the same harvest written as bfloat16:
   harvest tokens/s of each, pairs alternating; the int8 writer encodes each shard on its worker threads.

The machine is shared, so every figure is a set of pairs measured back to back (baseline, then ours,
the order alternating), with `sync` before each timed run so that no run pays for the last one's dirty
pages; a ratio is the median over the pairs, and its range is shown. Outputs go to --workdir (removed).
`--heap retain` makes the process keep freed memory in its heap (native/heap.py, as the trainer does),
baselines included; by default glibc's thresholds are left alone, as `harvest` leaves them.

    flock /work/bench.lock .venv/bin/python bench/bench_writer.py --out bench/results/writer.json
    .venv/bin/python bench/bench_writer.py --only grid --reps 3      # one part, fewer pairs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import cache  # noqa: E402
from cache.names import TOKEN_FIELDS  # noqa: E402
from native.heap import retain_freed_memory  # noqa: E402

QWEN3_WIDTH, QWEN3_BLOCKS = 2048, 28
SHARD_BYTES = 48 << 20  # grid shards: the harvest default of 16,384 rows, fewer when a shard would pass this


def _sync_disk() -> None:
    os.sync()


def _clean(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def save_file_fsync(shards: list[dict[str, torch.Tensor]], out: Path) -> float:
    """Seconds to write each shard with safetensors.save_file and fsync it: the disk's own bandwidth for
    these bytes, through the library a user would reach for."""
    _clean(out)
    out.mkdir(parents=True)
    _sync_disk()
    t0 = time.perf_counter()
    for i, tensors in enumerate(shards):
        path = out / f"{i:06d}.safetensors"
        save_file(tensors, str(path))
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    seconds = time.perf_counter() - t0
    _clean(out)
    return seconds


def paired(baseline: Callable[[], float], ours: Callable[[], float], reps: int) -> dict:
    """reps back-to-back pairs, alternating which runs first. ratio = baseline time / our time."""
    base, mine = [], []
    for rep in range(reps):
        if rep % 2 == 0:
            base.append(baseline())
            mine.append(ours())
        else:
            mine.append(ours())
            base.append(baseline())
    ratios = [b / m for b, m in zip(base, mine, strict=True)]
    return {"baseline_s": base, "ours_s": mine, "ratios": ratios, "ratio": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios)}


def _tokens(n: int, first: int = 0) -> dict[str, torch.Tensor]:
    r = torch.arange(first, first + n)
    return {"token_ids": (r % 30000).to(torch.int32), "sequence": r // 128, "position": (r % 128).to(torch.int32),
            "document": r // 512}


# ---- 1. the writer against save_file + fsync ----------------------------------------------------
def grid_case(n_layers: int, dtype: torch.dtype, d: int, total_bytes: int, reps: int, work: Path) -> dict:
    itemsize = torch.empty(0, dtype=dtype).element_size()
    row_bytes = n_layers * d * itemsize
    shard_rows = 16384
    while shard_rows > 256 and shard_rows * row_bytes > SHARD_BYTES:
        shard_rows //= 2
    n_shards = max(2, total_bytes // (shard_rows * row_bytes))
    rows = n_shards * shard_rows
    g = torch.Generator().manual_seed(n_layers)
    acts = {L: (torch.randn(rows, d, generator=g) * 2 + 0.5).to(dtype) for L in range(n_layers)}
    tokens = _tokens(rows)
    shards = []
    for a in range(0, rows, shard_rows):
        s = {f"layer.{L}": t[a:a + shard_rows].contiguous() for L, t in acts.items()}
        s.update({k: v[a:a + shard_rows].clone() for k, v in tokens.items()})
        shards.append(s)
    piece = 4096  # appends the size of a harvest window

    def ours() -> float:
        out = work / "ours"
        _clean(out)
        _sync_disk()
        t0 = time.perf_counter()
        w = cache.CacheWriter(out, layers=list(range(n_layers)), d_model=d, dtype=str(dtype).removeprefix("torch."),
                              shard_rows=shard_rows, identity={"bench": 1}, metadata={}, async_write=True)
        for a in range(0, rows, piece):
            w.append("train", chunk=a // piece, offset=0, acts={L: t[a:a + piece] for L, t in acts.items()},
                     copy=False, **{k: v[a:a + piece] for k, v in tokens.items()})
        w.finish()
        seconds = time.perf_counter() - t0
        _clean(out)
        return seconds

    ours()  # warm: allocator, page cache of the inputs, imports
    result = paired(lambda: save_file_fsync(shards, work / "base"), ours, reps)
    nbytes = rows * row_bytes
    return {"layers": n_layers, "d": d, "dtype": str(dtype).removeprefix("torch."), "shard_rows": shard_rows,
            "shards": n_shards, "activation_bytes": nbytes,
            "baseline_GB_per_s": nbytes / min(result["baseline_s"]) / 1e9,
            "ours_GB_per_s": nbytes / min(result["ours_s"]) / 1e9, **result}


def bench_grid(args: argparse.Namespace, work: Path) -> list[dict]:
    cases = []
    for n_layers in (1, 6, 30):
        for dtype in (torch.float32, torch.bfloat16):
            case = grid_case(n_layers, dtype, 384, args.grid_bytes, args.reps, work)
            cases.append(case)
            print(f"| {n_layers} | {case['dtype']} | {case['shard_rows']} x {case['shards']} | "
                  f"{case['baseline_GB_per_s']:.2f} | {case['ours_GB_per_s']:.2f} | {case['ratio']:.2f} "
                  f"({case['ratio_min']:.2f}-{case['ratio_max']:.2f}) |", flush=True)
    return cases


# ---- 2. a harvest with a producer as fast as a GPU ----------------------------------------------
def synthetic_case(layers: list[int], tokens: int, shard_rows: int, reps: int, work: Path,
                   window: int = 64, seq_len: int = 128) -> dict:
    from bench_harvest import _plans, synthetic_sequences

    from harvest.capture import WindowSink

    seqs = synthetic_sequences(max(1, tokens // seq_len), seq_len, 151936, [], [])
    plans = _plans(seqs, window, 64)
    most = max(p.rows for p in plans)
    g = torch.Generator().manual_seed(len(layers))
    bank = {L: torch.randn(most, QWEN3_WIDTH, generator=g).to(torch.bfloat16) for L in layers}
    counts = {s: sum(p.rows for p in plans if p.split == s) for s in ("train", "heldout")}
    shards = []
    for n in counts.values():
        for a in range(0, n, shard_rows):
            m = min(shard_rows, n - a)
            s = {f"layer.{L}": b[:m] for L, b in bank.items()}  # views: save_file reads them as they are
            s.update({k: v[:m].clone() for k, v in _tokens(m).items()})
            shards.append(s)

    def ours() -> float:
        out = work / "synthetic"
        _clean(out)
        _sync_disk()
        t0 = time.perf_counter()
        w = cache.CacheWriter(out, layers=layers, d_model=QWEN3_WIDTH, dtype="bfloat16", shard_rows=shard_rows,
                              identity={"bench": 1}, metadata={}, async_write=True)
        sink = WindowSink(w, torch.device("cpu"))
        for plan in plans:
            sink.submit(plan, {L: b[:plan.rows] for L, b in bank.items()}, 0)
        sink.close()
        w.finish()
        seconds = time.perf_counter() - t0
        _clean(out)
        return seconds

    ours()
    result = paired(lambda: save_file_fsync(shards, work / "base"), ours, reps)
    rows = sum(counts.values())
    nbytes = rows * len(layers) * QWEN3_WIDTH * 2
    return {"layers": len(layers), "d": QWEN3_WIDTH, "dtype": "bfloat16", "tokens": rows, "shard_rows": shard_rows,
            "shards": len(shards), "activation_bytes": nbytes,
            "disk_GB_per_s": nbytes / min(result["baseline_s"]) / 1e9,
            "harvest_GB_per_s": nbytes / min(result["ours_s"]) / 1e9,
            "harvest_tokens_per_s": rows / min(result["ours_s"]), **result}


def int8_case(layers: list[int], tokens: int, shard_rows: int, reps: int, work: Path, d: int,
              window: int = 64, seq_len: int = 128) -> dict:
    """Synthetic harvest (as in synthetic_case) written as int8 (ours) against bfloat16 (baseline)."""
    from bench_harvest import _plans, synthetic_sequences

    from harvest.capture import WindowSink

    seqs = synthetic_sequences(max(1, tokens // seq_len), seq_len, 151936, [], [])
    plans = _plans(seqs, window, 64)
    most = max(p.rows for p in plans)
    g = torch.Generator().manual_seed(len(layers))
    bank = {L: torch.randn(most, d, generator=g).to(torch.bfloat16) for L in layers}

    def run(dtype: str) -> Callable[[], float]:
        def timed() -> float:
            out = work / f"int8-{dtype}"
            _clean(out)
            _sync_disk()
            t0 = time.perf_counter()
            w = cache.CacheWriter(out, layers=layers, d_model=d, dtype=dtype, shard_rows=shard_rows,
                                  identity={"bench": 1}, metadata={}, async_write=True)
            sink = WindowSink(w, torch.device("cpu"))
            for plan in plans:
                sink.submit(plan, {L: b[:plan.rows] for L, b in bank.items()}, 0)
            sink.close()
            w.finish()
            seconds = time.perf_counter() - t0
            nbytes[dtype] = cache.open(out).size_on_disk()
            _clean(out)
            return seconds
        return timed

    nbytes: dict[str, int] = {}
    run("int8")()
    result = paired(run("bfloat16"), run("int8"), reps)
    rows = sum(p.rows for p in plans)
    return {"layers": len(layers), "d": d, "tokens": rows, "shard_rows": shard_rows,
            "bf16_tokens_per_s": rows / statistics.median(result["baseline_s"]),
            "int8_tokens_per_s": rows / statistics.median(result["ours_s"]),
            "bytes_int8_over_bf16": nbytes["int8"] / nbytes["bfloat16"], **result}


def bench_int8(args: argparse.Namespace, work: Path) -> list[dict]:
    cases = []
    for layers, tokens, shard_rows, d in (([0, 1, 2, 3, 4, 5], 131072, 16384, 384),
                                          ([6], args.synthetic_tokens_1, 16384, QWEN3_WIDTH)):
        case = int8_case(layers, tokens, shard_rows, args.reps, work, d)
        cases.append(case)
        print(f"| {case['layers']} x {case['d']} | {case['tokens']:,} | {case['bf16_tokens_per_s']:,.0f} | "
              f"{case['int8_tokens_per_s']:,.0f} | {case['ratio']:.2f} "
              f"({case['ratio_min']:.2f}-{case['ratio_max']:.2f}) | {case['bytes_int8_over_bf16']:.3f} |", flush=True)
    return cases


def bench_synthetic(args: argparse.Namespace, work: Path) -> list[dict]:
    cases = []
    for layers, tokens, shard_rows in (([6], args.synthetic_tokens_1, 16384),
                                       (list(range(6, 21)), args.synthetic_tokens_15, 2048)):
        case = synthetic_case(layers, tokens, shard_rows, args.reps, work)
        cases.append(case)
        print(f"| {case['layers']} | {case['tokens']:,} | {case['shard_rows']} x {case['shards']} | "
              f"{case['disk_GB_per_s']:.2f} | {case['harvest_GB_per_s']:.2f} | {case['ratio']:.2f} "
              f"({case['ratio_min']:.2f}-{case['ratio_max']:.2f}) |", flush=True)
    return cases


# ---- 3. the MiniLM default harvest against its bare forward -------------------------------------
def bench_minilm(args: argparse.Namespace, work: Path) -> dict:
    from bench_harvest import _plans, build_model, synthetic_sequences, time_forward, time_harvest

    device = torch.device("cpu")
    lm, prefix, suffix, vocab = build_model("minilm", device, "auto")
    layers = list(range(lm.n_blocks))
    seqs = synthetic_sequences(args.minilm_sequences, 128, vocab, prefix, suffix)
    hv = argparse.Namespace(store_dtype="float32", batch_size=64, window=256, shard_rows=16384)
    plans = _plans(seqs, hv.window, hv.batch_size)
    warm = [q for q in seqs if q.split == "train"][:64]
    time_harvest(lm, warm, layers, hv, None, work / "warm")
    time_forward(lm, plans[:1], None)

    def harvest() -> float:
        _sync_disk()
        return time_harvest(lm, seqs, layers, hv, "safetensors", work / "minilm")[0]

    result = paired(lambda: time_forward(lm, plans, max(layers)), harvest, args.minilm_reps)
    tokens = sum(p.rows for p in plans)
    return {"model": "all-MiniLM-L6-v2", "layers": len(layers), "store_dtype": "float32", "tokens": tokens,
            "threads": torch.get_num_threads(), "forward_tokens_per_s": tokens / min(result["baseline_s"]),
            "harvest_tokens_per_s": tokens / min(result["ours_s"]), **result}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="grid,synthetic,minilm", help="comma-separated parts to run")
    p.add_argument("--reps", type=int, default=9, help="pairs per grid / synthetic case")
    p.add_argument("--grid-bytes", type=int, default=800 << 20, help="activation bytes per grid case")
    p.add_argument("--synthetic-tokens-1", type=int, default=262144)
    p.add_argument("--synthetic-tokens-15", type=int, default=32768)
    p.add_argument("--minilm-sequences", type=int, default=200)
    p.add_argument("--minilm-reps", type=int, default=5)
    p.add_argument("--workdir", default=str(ROOT / "bench" / "_work" / "writer"))
    p.add_argument("--out", default=None, help="write every figure as JSON here")
    p.add_argument("--heap", choices=("retain", "default"), default="default",
                   help="retain: glibc keeps freed memory (native/heap.py, as the trainer sets it; the "
                        "harvest does not), for the baselines as well; default: glibc's own thresholds")
    args = p.parse_args()
    retained = args.heap == "retain" and retain_freed_memory()
    parts = set(args.only.split(","))
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"command": " ".join(sys.argv), "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "cpus": os.cpu_count(), "token_fields": list(TOKEN_FIELDS), "heap_retained": retained}
    t0 = time.perf_counter()
    try:
        if "grid" in parts:
            print("\n## CacheWriter vs save_file + fsync of the same shards (width 384)\n"
                  "| layers | dtype | shard rows x shards | save_file+fsync GB/s | CacheWriter GB/s | ratio (range) |\n"
                  "|---|---|---|---|---|---|", flush=True)
            results["grid"] = bench_grid(args, work)
        if "int8" in parts:
            print("\n## Synthetic harvest written as int8 vs as bfloat16 (pairs alternating)\n"
                  "| layers x width | tokens | bf16 tokens/s | int8 tokens/s | ratio int8/bf16 (range) "
                  "| bytes int8/bf16 |\n"
                  "|---|---|---|---|---|---|", flush=True)
            results["int8"] = bench_int8(args, work)
        if "synthetic" in parts:
            print("\n## Harvest with a synthetic producer (2048 wide, 28-block shape, bf16) vs the disk\n"
                  "| layers | tokens | shard rows x shards | disk (save_file+fsync) GB/s | harvest GB/s "
                  "| ratio (range) |\n|---|---|---|---|---|---|", flush=True)
            results["synthetic"] = bench_synthetic(args, work)
        if "minilm" in parts:
            m = bench_minilm(args, work)
            results["minilm"] = m
            print(f"\n## MiniLM default harvest vs bare forward\nforward {m['forward_tokens_per_s']:,.0f} tok/s, "
                  f"harvest {m['harvest_tokens_per_s']:,.0f} tok/s, ratio {m['ratio']:.3f} "
                  f"({m['ratio_min']:.3f}-{m['ratio_max']:.3f}) over {len(m['ratios'])} pairs", flush=True)
    finally:
        _clean(work)
    results["seconds"] = time.perf_counter() - t0
    print(f"\ntotal {results['seconds']:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
