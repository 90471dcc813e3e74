"""Benchmarks of train/data.py's ActivationLoader (results: bench/RESULTS.md, "Training data loader").

1. memory: the same loader + TopK training loop, a fixed number of steps, in a fresh process per
   cache, on a cache and one 4x larger: peak RssAnon (sampled every millisecond, and after every
   step) must agree within 10%.
2. speed: TopK (d=384, d_sae=3072, k=32, batch 4096 tokens, Adam, clipping, unit-norm decoder) fed
   by the loader from the cache vs the same loop fed from a tensor already in memory (pre-shuffled,
   sliced: no data cost at all). Steps alternate between the two feeds so that load from other
   processes hits both alike; tokens/s = tokens / median step time. Target ratio >= 0.95.
3. mixing at the default cache's shape (1.79M rows, sequences of 126 cached rows, harvest windows
   of 256 sequences, batch 4096): share of batch rows that share a sequence with another row of the
   batch, for several block sizes, vs a uniform shuffle's 1 - (1 - B/N)^(S-1).
4. gpu (CUDA only, --only gpu): the loader alone, and a TopK loop on the GPU fed by it vs from a
   tensor already on the GPU.

    .venv/bin/python bench/bench_loader.py            # 1-3, caches under bench/_work/ (kept for reruns)
    .venv/bin/python bench/bench_loader.py --only speed --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import cache  # noqa: E402
from sae.base import SAEConfig  # noqa: E402
from sae.topk import TopKSAE  # noqa: E402
from tests.train.cache_fixtures import decode_ids, write_cache  # noqa: E402
from train.data import ActivationLoader  # noqa: E402

D, D_SAE, K, BATCH = 384, 3072, 32, 4096
WORK = ROOT / "bench" / "_work"


def ensure_cache(path: Path, rows: int, **kwargs) -> cache.Cache:
    """Open the cache at `path`, writing it first unless a complete one with `rows` rows is there."""
    try:
        c = cache.open(path)
        if c.num_rows("train") == rows and c.d_model == kwargs.get("d_model", D):
            return c
    except (FileNotFoundError, ValueError):
        pass
    t = time.perf_counter()
    kwargs = {"content": "gaussian", "d_model": D, "layers": [0], "seq_len": 128, "window_seqs": 256,
              "shard_rows": 16384, "n_heldout": 1000, **kwargs}
    write_cache(path, n_train=rows, **kwargs)
    c = cache.open(path)
    print(f"  wrote {path.name}: {rows:,} rows, {c.size_on_disk() / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s")
    return c


class Trainer:
    """The TopK step of the training loop: forward, loss, backward, parallel-gradient removal,
    clipping, Adam, decoder renormalisation."""

    def __init__(self, sample: torch.Tensor, device: str = "cpu") -> None:
        torch.manual_seed(0)
        self.sae = TopKSAE(SAEConfig(type="topk", hidden_size=D, latent_size=D_SAE, k=K, layers=[0])).to(device)
        self.sae.set_input_scale(D**0.5 / sample.float().norm(dim=1).mean())
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=4e-4)

    def step(self, x: torch.Tensor) -> None:
        out = self.sae(x, dense_acts=False)
        loss = self.sae.loss(out)["total"]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.sae.remove_parallel_grads()
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), 1.0)
        self.opt.step()
        self.sae.normalize_decoder()


# ---- 1. memory -------------------------------------------------------------------------------
def _rss_anon_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise RuntimeError("no RssAnon in /proc/self/status")


def memory_child(path: str, steps: int) -> None:
    """In a fresh process: loader + TopK loop for `steps` steps; prints peak RssAnon as JSON."""
    peak, done = [_rss_anon_kb()], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_anon_kb())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    c = cache.open(path)
    loader = ActivationLoader(c, 0, BATCH)
    batches = loader.batches()
    first = next(batches)
    trainer = Trainer(first.x)
    for _ in range(steps):
        trainer.step(next(batches).x)
        peak[0] = max(peak[0], _rss_anon_kb())
    loader.close()
    done.set()
    sampler.join()
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"peak_rss_anon_kb": peak[0], "vm_hwm_kb": hwm, "rows": c.num_rows("train")}))


def bench_memory(rows: int, steps: int) -> dict:
    small = ensure_cache(WORK / f"gauss-{rows}", rows)
    big = ensure_cache(WORK / f"gauss-{4 * rows}", 4 * rows)
    out = {}
    for name, c in (("small", small), ("big", big)):
        cmd = [sys.executable, __file__, "--memory-child", str(c.path), "--steps", str(steps),
               "--threads", str(torch.get_num_threads())]
        res = subprocess.run(cmd, check=True, capture_output=True, text=True)
        out[name] = json.loads(res.stdout.strip().splitlines()[-1]) | {"gb": c.size_on_disk() / 1e9}
        print(f"  {name}: {out[name]}")
    out["ratio"] = out["big"]["peak_rss_anon_kb"] / out["small"]["peak_rss_anon_kb"]
    return out


# ---- 2. speed --------------------------------------------------------------------------------
def bench_speed(rows: int, steps: int) -> dict:
    c = ensure_cache(WORK / f"gauss-{rows}", rows)
    loader = ActivationLoader(c, 0, BATCH)
    from_cache = loader.batches()
    n_mem = steps + 2
    memory = torch.cat([c.read("train", i, 0) for i in range(len(c.shards("train")))])[: n_mem * BATCH]
    memory = memory[torch.randperm(len(memory))].contiguous()  # in RAM, shuffled once: free batches
    trainer = Trainer(memory[:BATCH])
    times: dict[str, list[float]] = {"cache": [], "memory": []}
    m = 0
    for _ in range(2):  # warm-up: first touches, allocator, MKL
        trainer.step(next(from_cache).x)
        trainer.step(memory[m * BATCH:(m + 1) * BATCH])
        m += 1
    for _ in range(steps):  # alternate step by step: load from other processes hits both alike
        t = time.perf_counter()
        trainer.step(next(from_cache).x)
        times["cache"].append(time.perf_counter() - t)
        t = time.perf_counter()
        trainer.step(memory[m * BATCH:(m + 1) * BATCH])
        times["memory"].append(time.perf_counter() - t)
        m += 1
    loader.close()
    rate = {k: BATCH / statistics.median(v) for k, v in times.items()}
    mean_rate = {k: BATCH * len(v) / sum(v) for k, v in times.items()}
    out = {"tokens_per_s": rate, "mean_tokens_per_s": mean_rate, "ratio": rate["cache"] / rate["memory"],
           "mean_ratio": mean_rate["cache"] / mean_rate["memory"], "steps_each": steps,
           "loader_alone_tokens_per_s": _loader_alone(c)}
    print(f"  {json.dumps(out)}")
    return out


def _loader_alone(c: cache.Cache, n: int = 60, block_rows: int = 64) -> float:
    """Tokens/s the loader delivers to a consumer that does nothing."""
    loader = ActivationLoader(c, 0, BATCH, block_rows=block_rows)
    it = loader.batches()
    next(it)
    t = time.perf_counter()
    for _ in range(n):
        next(it)
    rate = n * BATCH / (time.perf_counter() - t)
    loader.close()
    return rate


# ---- 3. mixing -------------------------------------------------------------------------------
def bench_mixing(block_sizes: list[int]) -> dict:
    n, s, window = 1_794_048, 126, 256  # rows are a multiple of 126: every sequence is full
    c = ensure_cache(WORK / "ids-default-shape", n, content="ids", d_model=4, seq_len=s, window_seqs=window,
                     shard_rows=16384, n_heldout=0)
    expected = 1 - (1 - BATCH / n) ** (s - 1)
    out = {"uniform_formula": expected, "rows": n, "seq_rows": s, "window_seqs": window}
    for block in block_sizes:
        loader = ActivationLoader(c, 0, BATCH, block_rows=block)
        shares = []
        for batch in loader.batches():
            if batch.epoch > 0:
                break
            _, inv, counts = torch.unique(decode_ids(batch.x)["sequence"], return_inverse=True, return_counts=True)
            shares.append((counts[inv] >= 2).float().mean().item())
        loader.close()
        out[f"block_{block}"] = statistics.mean(shares[:-1])  # the short last batch left out
        print(f"  block_rows={block}: share {out[f'block_{block}']:.4f} (uniform formula {expected:.4f})")
    return out

# ---- 4. GPU (CUDA only) ----------------------------------------------------------------------
def _gpu_rate(trainer: Trainer, feed, steps: int) -> float:
    """Tokens/s of `steps` training steps on batches from feed(i), after 10 warm-up steps."""
    for i in range(10):
        trainer.step(feed(i))
    torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(steps):
        trainer.step(feed(i))
    torch.cuda.synchronize()
    return steps * BATCH / (time.perf_counter() - t)


def _to_cuda(batches):
    return lambda i: next(batches).x.to("cuda")


def _gpu_one(c: cache.Cache, steps: int) -> dict:
    res = {}
    on_gpu = torch.cat([c.read("train", i, 0) for i in range(4)]).to("cuda", torch.float32)
    n_gpu = len(on_gpu) // BATCH
    trainer = Trainer(on_gpu[:BATCH], "cuda")
    res["gpu_memory_tokens_per_s"] = _gpu_rate(
        trainer, lambda i: on_gpu[(i % n_gpu) * BATCH:(i % n_gpu + 1) * BATCH], steps)
    for block in (64, 256):
        with ActivationLoader(c, 0, BATCH, block_rows=block) as loader:
            res[f"loader_alone_block{block}_tokens_per_s"] = _loader_alone(c, 200, block)
            feed = _to_cuda(loader.batches())
            res[f"loader_block{block}_tokens_per_s"] = _gpu_rate(trainer, feed, steps)
    x = torch.randn(BATCH, D)
    t = time.perf_counter()
    for _ in range(50):
        x.to("cuda")
    torch.cuda.synchronize()
    res["h2d_pageable_tokens_per_s"] = 50 * BATCH / (time.perf_counter() - t)
    return res


def bench_gpu(rows: int, steps: int) -> dict:
    """On CUDA: what the loader delivers alone, and a TopK loop on the GPU fed by the loader
    (batch.x.to(cuda)) vs from a tensor already on the GPU, for blocks of 64 and 256 rows."""
    out = {"gpu": torch.cuda.get_device_name()}
    for dtype in ("float32", "bfloat16"):
        name = f"gauss-{rows}" if dtype == "float32" else f"gauss-{dtype}-{rows}"
        out[dtype] = _gpu_one(ensure_cache(WORK / name, rows, dtype=dtype), steps)
        print(f"  {dtype}: {json.dumps(out[dtype])}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["memory", "speed", "mixing", "gpu"])
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    p.add_argument("--rows", type=int, default=500_000, help="train rows of the smaller cache (the other: 4x)")
    p.add_argument("--steps", type=int, default=30, help="memory: training steps per process")
    p.add_argument("--speed-steps", type=int, default=30, help="speed: steps of each feed (alternating)")
    p.add_argument("--gpu-steps", type=int, default=300)
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.memory_child:
        return memory_child(a.memory_child, a.steps)
    if a.threads:
        torch.set_num_threads(a.threads)
    WORK.mkdir(parents=True, exist_ok=True)
    results = {"torch_threads": torch.get_num_threads()}
    if a.only == "gpu":
        results["gpu"] = bench_gpu(a.rows, a.gpu_steps)
    if a.only in (None, "memory"):
        print("memory (peak RssAnon, fresh process per cache):")
        results["memory"] = bench_memory(a.rows, a.steps)
    if a.only in (None, "speed"):
        print("speed (TopK step fed from the cache vs from RAM):")
        results["speed"] = bench_speed(a.rows, a.speed_steps)
    if a.only in (None, "mixing"):
        print("mixing (default cache shape):")
        results["mixing"] = bench_mixing([256, 64, 16])
    (WORK / "bench_loader.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
