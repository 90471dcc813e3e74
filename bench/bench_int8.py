"""The 8-bit cache (issue 14): what it costs in reconstruction error and in the trained SAE.

    python bench/bench_int8.py error CACHE [--shards 2]
        Relative error per layer of the stored rows against the float32 rows of a float32 CACHE, for
        the encoding kept (`int8`: per-column RMS and per-row absmax scales, cache/encoding.py) and the
        candidates measured against it: int8 with a per-row absmax scale only, float8_e4m3fn with a
        per-row scale, float8_e4m3fn with both scales; bfloat16 as the reference. `rel` is
        sqrt(sum |x' - x|^2 / sum |x|^2) over the rows; `noise/var` is sum |x' - x|^2 over the rows'
        total variance (sum |x - mean|^2): the FVU a perfect reconstruction of x' scores against x.

    python bench/bench_int8.py fvu RUN_A RUN_B --heldout CACHE
        Held-out metrics of two trained SAEs (their run folders) on CACHE's held-out split (the float32
        rows), and the FVU difference.

    python bench/bench_int8.py compare CACHE_8BIT CACHE_F32
        The same relative error over every train row of a stored 8-bit cache (a harvest or a conversion)
        against the float32 cache of the same tokens.

    python bench/bench_int8.py bytes CACHE_8BIT CACHE_REF
        Bytes on disk per token-layer of the activations, against 2 * d_model (bfloat16).

    flock /work/bench.lock python bench/bench_int8.py loader CACHE_INT8 CACHE_BF16 [--layer 2 --steps 40]
        One TopK trainer (bench_loader.py's step: d_sae 3072, k 32, batch 4096) fed alternately, step by
        step, by the ActivationLoader over the int8 cache and over the bfloat16 cache of the same tokens
        (float32 batches from both), so that load from other processes hits both alike; tokens/s from the
        median step time, and each loader alone (a consumer that does nothing).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cache  # noqa: E402
from cache import encoding  # noqa: E402


def _int8_row(x: torch.Tensor) -> torch.Tensor:
    s = x.abs().amax(dim=1, keepdim=True) / 127
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.round(x / s).clamp(-127, 127) * s


def _fp8_row(x: torch.Tensor) -> torch.Tensor:
    s = x.abs().amax(dim=1, keepdim=True) / 448  # float8_e4m3fn's largest finite value
    s = torch.where(s > 0, s, torch.ones_like(s))
    return (x / s).to(torch.float8_e4m3fn).to(torch.float32) * s


def _fp8_col_row(x: torch.Tensor) -> torch.Tensor:
    c = encoding.column_scale(x)
    return _fp8_row(x / c) * c


CANDIDATES = {
    "bfloat16": lambda x: x.to(torch.bfloat16).to(torch.float32),
    "int8 (kept: column RMS + row absmax)": lambda x: encoding.decode(*encoding.encode(x)),
    "int8, row absmax only": _int8_row,
    "fp8 e4m3, row scale": _fp8_row,
    "fp8 e4m3, column + row scales": _fp8_col_row,
}


def error(path: str, shards: int) -> None:
    c = cache.open(path)
    if c.manifest["dtype"] != "float32":
        raise SystemExit(f"{path} stores {c.manifest['dtype']}; the error is measured against float32 rows")
    n = min(shards, len(c.shards("train")))
    print(f"cache {path}: first {n} train shard(s), each encoded as one shard; layers {c.layers}, d {c.d_model}")
    names = list(CANDIDATES)
    print("| layer | max column RMS / median | " + " | ".join(f"{k}: rel, noise/var" for k in names) + " |")
    print("| --- " * (len(names) + 2) + "|")
    for layer in c.layers:
        err = {k: 0.0 for k in names}
        total = var = 0.0
        ratio = 0.0
        for i in range(n):
            x = c.read("train", i, layer).to(torch.float32)
            x64 = x.to(torch.float64)
            total += float((x64 * x64).sum())
            var += float(((x64 - x64.mean(0)) ** 2).sum())
            col = torch.sqrt((x64 * x64).mean(0))
            ratio = max(ratio, float(col.max() / col.median()))
            for k, f in CANDIDATES.items():
                e = f(x).to(torch.float64) - x64
                err[k] += float((e * e).sum())
        cells = " | ".join(f"{np.sqrt(err[k] / total):.4f}, {err[k] / var:.1e}" for k in names)
        print(f"| {layer} | {ratio:.1f} | {cells} |", flush=True)


def compare(path_8bit: str, path_ref: str) -> None:
    a, b = cache.open(path_8bit), cache.open(path_ref)
    shards = a.shards("train")
    if [s.rows for s in shards] != [s.rows for s in b.shards("train")]:
        raise SystemExit("the two caches do not hold the same train shards")
    print(f"{path_8bit} ({a.manifest['dtype']}) against {path_ref} ({b.manifest['dtype']}): every train row")
    print("| layer | rel | noise/var |\n| --- | --- | --- |")
    for layer in a.layers:
        err = total = 0.0
        s1 = np.zeros(a.d_model)
        s2 = 0.0
        for info in shards:
            x = b.read("train", info.index, layer).to(torch.float64)
            e = a.read("train", info.index, layer).to(torch.float64) - x
            err += float((e * e).sum())
            total += float((x * x).sum())
            s1 += x.sum(0).numpy()
            s2 += float((x * x).sum())
        n = a.num_rows("train")
        var = s2 - float((s1 * s1).sum()) / n
        print(f"| {layer} | {np.sqrt(err / total):.4f} | {err / var:.1e} |", flush=True)


def fvu(run_a: str, run_b: str, heldout: str) -> None:
    from evaluate.heldout import heldout_metrics
    from sae import load_sae

    c = cache.open(heldout)
    out = {}
    for run in (run_a, run_b):
        sae, _ = load_sae(Path(run) / "sae")
        m = heldout_metrics(sae, c)["metrics"]
        summary_file = Path(run) / "train_summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
        out[run] = m
        print(f"{run}: trained on {summary.get('cache', '?')}; held-out ({heldout}, {c.manifest['dtype']}) "
              f"FVU {m['fvu']:.5f}, " + ", ".join(f"{k} {v:.4g}" for k, v in m.items()
                                                        if k != "fvu" and isinstance(v, float)))
    print(f"FVU difference ({run_a} - {run_b}): {out[run_a]['fvu'] - out[run_b]['fvu']:+.5f}")


def size(path_8bit: str, path_ref: str) -> None:
    from cache.st_backend import StShard

    for path in (path_8bit, path_ref):
        c = cache.open(path)
        tokens = sum(c.num_rows(s) for s in c.splits)
        total = sum(e["bytes"] for s in c.splits for e in c.manifest["shards"][s])
        line = (f"{path} ({c.manifest['dtype']}, {c.backend}): whole shards {total / tokens / len(c.layers):.1f} "
                f"bytes per token-layer (token fields and statistics included) = "
                f"{total / tokens / len(c.layers) / (2 * c.d_model):.4f} of 2*d_model")
        if c.backend == "safetensors":  # the activations alone: codes and scales, or the float rows
            act = 0
            for s in c.splits:
                for info in c.shards(s):
                    entries = StShard(c.path / info.name).entries
                    act += sum(e[3] - e[2] for k, e in entries.items() if k.startswith(("layer.", "scale.")))
            line += f"; activations alone {act / tokens / len(c.layers) / (2 * c.d_model):.4f} of 2*d_model"
        print(line)


def loader(path_a: str, path_b: str, layer: int, steps: int) -> None:
    import statistics
    import time

    from bench.bench_loader import BATCH, Trainer
    from train.data import ActivationLoader

    caches = {p: cache.open(p) for p in (path_a, path_b)}
    loaders = {p: ActivationLoader(c, layer, BATCH, seed=0) for p, c in caches.items()}
    its = {p: ld.batches() for p, ld in loaders.items()}
    trainer = Trainer(next(its[path_a]).x)
    times: dict[str, list[float]] = {p: [] for p in caches}
    for i in range(steps + 2):
        for p, it in its.items():
            t = time.perf_counter()
            trainer.step(next(it).x)
            if i >= 2:  # warm-up: first touches, allocator, MKL
                times[p].append(time.perf_counter() - t)
    for ld in loaders.values():
        ld.close()
    alone = {}
    for p, c in caches.items():
        with ActivationLoader(c, layer, BATCH, seed=1) as ld:
            it = ld.batches()
            next(it)
            t = time.perf_counter()
            for _ in range(60):
                next(it)
            alone[p] = 60 * BATCH / (time.perf_counter() - t)
    rate = {p: BATCH / statistics.median(v) for p, v in times.items()}
    print(f"(ran on the shared 2-core machine while other helpers may have used the CPU; {steps} steps each, "
          f"alternating; torch threads {torch.get_num_threads()})")
    for p in caches:
        print(f"{p} ({caches[p].manifest['dtype']}): TopK fed by the loader {rate[p]:,.0f} tokens/s (median step); "
              f"loader alone {alone[p]:,.0f} tokens/s")
    print(f"ratio {path_a} / {path_b}: training {rate[path_a] / rate[path_b]:.3f}, loader alone "
          f"{alone[path_a] / alone[path_b]:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("error")
    e.add_argument("cache")
    e.add_argument("--shards", type=int, default=2)
    f = sub.add_parser("fvu")
    f.add_argument("run_a")
    f.add_argument("run_b")
    f.add_argument("--heldout", required=True)
    cmp = sub.add_parser("compare")
    cmp.add_argument("cache_8bit")
    cmp.add_argument("cache_ref")
    b = sub.add_parser("bytes")
    b.add_argument("cache_8bit")
    b.add_argument("cache_ref")
    ld = sub.add_parser("loader")
    ld.add_argument("cache_a")
    ld.add_argument("cache_b")
    ld.add_argument("--layer", type=int, default=2)
    ld.add_argument("--steps", type=int, default=40)
    a = p.parse_args()
    if a.cmd == "error":
        error(a.cache, a.shards)
    elif a.cmd == "fvu":
        fvu(a.run_a, a.run_b, a.heldout)
    elif a.cmd == "compare":
        compare(a.cache_8bit, a.cache_ref)
    elif a.cmd == "loader":
        loader(a.cache_a, a.cache_b, a.layer, a.steps)
    else:
        size(a.cache_8bit, a.cache_ref)


if __name__ == "__main__":
    main()
