"""Our TopK / BatchTopK / Matryoshka training against SAELens and EleutherAI sparsify, on the same
cached activations, in one run (results: bench/RESULTS.md, "Against the public trainers").

Setting (ANCHORS.md): MiniLM block 2 (hidden_states[3]) from the project's cache, inputs scaled by one
fixed scalar (E||x|| = sqrt(d) on the train split; each library's own normaliser off), d_in 384,
d_sae 3072, k 32, batch 4096 tokens, fp32, Adam lr 4e-4 constant, no warm-up, one pass, 2 threads.
Matryoshka groups [192, 384, 768, 1728].

1. The row stream: the rows our trainer's loader yields for one epoch (same class, same settings:
   seed, batch, shuffle buffer), written once to bench/_work/peers/train.f32 with the held-out rows,
   so that every implementation trains on exactly the same rows in the same order.
2. One subprocess per (implementation, architecture, repeat): ours in .venv (bench/peers/ours_worker.py,
   the project's trainer), SAELens and sparsify in .venv-peers (bench/setup_peers.sh). Each reports
   steady tokens/s (bench/peers/runmeter.py), held-out FVU / L0 / dead in inference mode
   (bench/peers/heldout_eval.py) and its peak RSS; this process also samples each child's RssAnon.
   By default the workers of one architecture run side by side in lockstep: they take turns, one
   training step each, so that the other engineers' jobs on this shared machine slow every
   implementation alike (only a worker's own steps are timed). `--sequential` runs them one by one.
3. Medians over repeats; ratios ours / best peer; goals checked and printed (not asserted).

`--lr` runs every implementation at another common lr (the lr a parametrisation needs differs between
libraries; bench/RESULTS.md sweeps it). `--impl ... ours-bf16` adds our trainer in bf16 autocast,
reported beside the float32 comparison, never as a peer.

    bash bench/setup_peers.sh                       # once
    .venv/bin/python bench/bench_peers.py           # everything, 2 repeats
    .venv/bin/python bench/bench_peers.py --steps 20 --repeats 1   # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / "bench" / "peers"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(PEERS))

from ours_worker import build_config  # noqa: E402
from runmeter import COMMON_LR as DEFAULT_LR  # noqa: E402
from streamfile import StreamMeta, write_meta, write_split  # noqa: E402

WORK = ROOT / "bench" / "_work" / "peers"
PEER_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
# glibc returns every allocation above its mmap threshold (32 MiB at most) to the system when freed, so
# each [4096, 3072] float32 temporary (50 MB) is page-faulted in afresh every step. These settings keep
# freed memory in the heap instead (`--reuse-freed-memory`, for every worker alike).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
              "MALLOC_TOP_PAD_": str(1 << 28)}
WORKERS = {"ours": "ours_worker.py", "ours-bf16": "ours_worker.py", "saelens": "saelens_worker.py",
           "sparsify": "sparsify_worker.py", "sparsify-bf16": "sparsify_worker.py"}
# ours-bf16: the same trainer with `training.dtype=bfloat16` (CPU autocast, float32 master weights): not
# the common setting's float32, so it is reported beside the comparison and never counted as a peer.
WORKER_ARGS = {"ours-bf16": ["--dtype", "bfloat16"], "sparsify-bf16": ["--dtype", "bfloat16"]}
OURS = ("ours", "ours-bf16")
PLAN = {"topk": ["ours", "saelens", "sparsify"], "batchtopk": ["ours", "saelens"], "matryoshka": ["ours", "saelens"]}


# ---- 1. the stream ----------------------------------------------------------------------------------
def write_stream(cache_path: str, layer: int, batch_size: int, steps: int | None, work: Path) -> StreamMeta:
    """Write the epoch-0 rows of our trainer's loader (first `steps` batches, or all) and the held-out rows."""
    import cache
    from train.data import ActivationLoader

    c = cache.open(cache_path)
    t = build_config("topk", cache_path, layer, batch_size, work / "runs").training
    # The same arguments train/run.py (_setup) gives the loader: so the same order.
    loader = ActivationLoader(c, layer, t.batch_size, seed=t.seed, buffer_rows=t.shuffle_buffer_rows)
    n_batches = loader.batches_per_epoch if steps is None else min(steps, loader.batches_per_epoch)

    def epoch_rows():
        for i, batch in zip(range(n_batches), loader.batches(0, 0), strict=False):
            assert batch.epoch == 0 and batch.index == i
            yield batch.x.numpy()

    work.mkdir(parents=True, exist_ok=True)
    with loader:
        rows = write_split(work, "train", epoch_rows(), c.d_model)
    held = (c.read("heldout", s.index, layer).numpy() for s in c.shards("heldout"))
    held_rows = write_split(work, "heldout", held, c.d_model)
    meta = StreamMeta(d=c.d_model, train_rows=rows, heldout_rows=held_rows, batch_size=t.batch_size,
                      scale=float(c.norm_scale(layer)), layer=layer, cache=str(cache_path),
                      source=f"train.data.ActivationLoader(seed={t.seed}, buffer_rows={t.shuffle_buffer_rows}), "
                             f"epoch 0, {n_batches} of {loader.batches_per_epoch} batches",
                      epoch_batches=loader.batches_per_epoch)
    write_meta(work, meta)
    return meta


# ---- 2. the workers -----------------------------------------------------------------------------------
class MemorySampler:
    """Peak VmRSS and RssAnon of a child process, read from /proc every `period` seconds."""

    def __init__(self, pid: int, period: float = 0.02):
        self.pid, self.period, self.peak = pid, period, {"VmRSS": 0, "RssAnon": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        path = Path(f"/proc/{self.pid}/status")
        while not self._stop.is_set():
            try:
                for line in path.read_text().splitlines():
                    key, _, value = line.partition(":")
                    if key in self.peak:
                        self.peak[key] = max(self.peak[key], int(value.split()[0]) * 1024)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                return
            time.sleep(self.period)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return dict(self.peak)


class Worker:
    """One worker subprocess, its log, its memory sampler and (in lockstep) its gate pipes."""

    def __init__(self, impl: str, arch: str, tag: str, work: Path, threads: int, peer_python: Path, gated: bool,
                 extra_env: dict[str, str] | None = None, lr: float = DEFAULT_LR):
        self.impl, self.arch, self.tag = impl, arch, tag
        self.out, self.log = work / "results" / f"{tag}.json", work / "logs" / f"{tag}.log"
        for folder in (self.out.parent, self.log.parent):
            folder.mkdir(parents=True, exist_ok=True)
        self.out.unlink(missing_ok=True)
        python = Path(sys.executable) if impl in OURS else peer_python
        cmd = [str(python), str(PEERS / WORKERS[impl]), "--arch", arch, "--work", str(work), "--out", str(self.out),
               "--lr", repr(lr), *WORKER_ARGS.get(impl, []),
               "--threads", str(threads)]
        fds: tuple[int, ...] = ()
        self.go = self.ready = None
        if gated:
            go_r, self.go = os.pipe()
            self.ready, ready_w = os.pipe()
            cmd += ["--gate", f"{go_r},{ready_w}"]
            fds = (go_r, ready_w)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", **(extra_env or {})}
        self.load_before, self.t0 = os.getloadavg()[0], time.perf_counter()
        self._fh = open(self.log, "w")  # noqa: SIM115 - closed in finish()
        self.proc = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env, pass_fds=fds)
        for fd in fds:
            os.close(fd)  # the child holds its ends; EOF on `ready` then means it is done (or died)
        self.sampler = MemorySampler(self.proc.pid)

    def wait_ready(self) -> bool:
        """Block until the worker ends a step (True) or closes its gate / exits (False)."""
        return os.read(self.ready, 1) == b"r"

    def step(self) -> bool:
        """Let the worker run one step; False once it has no steps left."""
        try:
            os.write(self.go, b"g")
        except BrokenPipeError:
            return False
        return self.wait_ready()

    def finish(self) -> dict:
        rc = self.proc.wait()
        sampled = self.sampler.stop()
        self._fh.close()
        for fd in (self.go, self.ready):
            if fd is not None:
                os.close(fd)
        if rc != 0 or not self.out.is_file():
            raise RuntimeError(f"{self.tag} failed (exit {rc}); log {self.log}:\n{self.log.read_text()[-3000:]}")
        doc = json.loads(self.out.read_text())
        doc.update(sampled_peak_rss_anon_bytes=sampled["RssAnon"], wall_seconds=time.perf_counter() - self.t0,
                   load_before=self.load_before, load_after=os.getloadavg()[0], key=self.impl)
        return doc


def run_lockstep(workers: list[Worker]) -> None:
    """Step the workers in turn (the first worker of each round rotates) until each has done all its
    steps: every implementation's steps are interleaved in time, so slow and busy spells of the
    shared machine hit them alike. Set-up and the first step run concurrently and are not timed."""
    active = [w for w in workers if w.wait_ready()]
    rnd = 0
    while active:
        turn = rnd % len(active)
        for w in active[turn:] + active[:turn]:
            if not w.step():
                active.remove(w)
        rnd += 1


def run_group(impls: list[str], arch: str, r: int, work: Path, threads: int, peer_python: Path,
              lockstep: bool, extra_env: dict[str, str] | None = None, lr: float = DEFAULT_LR) -> list[dict]:
    """Train `arch` with each implementation: together in lockstep, or one after the other."""
    stamp, code = time.strftime("%H:%M:%S"), code_fingerprint()  # what the workers import now
    print(f"[{stamp}] {arch}, repeat {r}: {', '.join(impls)} (load {os.getloadavg()[0]:.1f}) ...", flush=True)
    if lockstep:
        workers = [Worker(i, arch, f"{i}-{arch}-r{r}", work, threads, peer_python, True, extra_env, lr)
                   for i in impls]
        run_lockstep(workers)
        docs = [w.finish() for w in workers]
    else:
        docs = [Worker(i, arch, f"{i}-{arch}-r{r}", work, threads, peer_python, False, extra_env, lr).finish()
                for i in impls]
    for doc in docs:
        print(f"    {doc['impl']:16s} {doc['tokens_per_s']:8,.0f} tok/s, FVU {doc['fvu']:.4f}, L0 {doc['l0']:.1f}, "
              f"dead {100 * doc['dead_fraction']:.1f}%, peak RSS {doc['peak_rss_bytes'] / 1e9:.2f} GB", flush=True)
    return [{"repeat": r, "code": code, **doc} for doc in docs]


def run_all(arches: list[str], impls: list[str], repeats: int, work: Path, threads: int, peer_python: Path,
            lockstep: bool, extra_env: dict[str, str] | None = None, lr: float = DEFAULT_LR) -> list[dict]:
    results = []
    for r in range(repeats):
        for arch in arches:
            order = [i for i in PLAN[arch] + ["ours-bf16", "sparsify-bf16"] if i in impls
                     and (i != "sparsify-bf16" or "sparsify" in PLAN[arch])]
            order = order if r % 2 == 0 else order[::-1]  # sequential mode: alternate who goes first
            results += run_group(order, arch, r, work, threads, peer_python, lockstep, extra_env, lr)
    return results


def code_fingerprint() -> str:
    """A hash of the project code a run of ours executes (sae/, train/, cache/, settings/, configs/):
    other engineers change it while benchmarks run, and results from different code must not mix."""
    import hashlib

    h = hashlib.sha256()
    for folder in ("sae", "train", "cache", "settings", "configs"):
        for f in sorted((ROOT / folder).rglob("*")):
            if f.is_file() and f.suffix in (".py", ".yaml", ".c", ".h"):  # .c/.h: sae/native's kernels
                h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


# ---- 3. summary ---------------------------------------------------------------------------------------
def aggregate(results: list[dict], batch_size: int) -> dict[str, dict[str, dict]]:
    """{arch: {impl key: medians over repeats, with the spread of the quality metrics}}."""
    table: dict[str, dict[str, dict]] = {}
    for arch in dict.fromkeys(r["arch"] for r in results):
        table[arch] = {}
        for key in dict.fromkeys(r["key"] for r in results if r["arch"] == arch):
            runs = [r for r in results if r["arch"] == arch and r["key"] == key]
            med = {m: statistics.median(r[m] for r in runs)
                   for m in ("tokens_per_s", "wall_tokens_per_s", "step_ms_median", "peak_rss_bytes",
                             "sampled_peak_rss_anon_bytes", "fvu", "l0", "dead_fraction")}
            spread = {m: max(r[m] for r in runs) - min(r[m] for r in runs) for m in ("fvu", "l0", "dead_fraction")}
            # Robust to a burst of other jobs during part of a run: a full batch over the median step.
            med["median_step_tokens_per_s"] = statistics.median(batch_size * 1e3 / r["step_ms_median"] for r in runs)
            table[arch][key] = {"impl": runs[0]["impl"], "repeats": len(runs), **med, "spread": spread,
                                "all_tokens_per_s": [r["tokens_per_s"] for r in runs],
                                "threshold": runs[0].get("threshold"), "steps": runs[0]["steps"],
                                "tokens": runs[0]["tokens"], "own_report": runs[0].get("own_report"),
                                "code": sorted({r.get("code", "?") for r in runs})}
    return table


def goals(arch: str, rows: dict[str, dict], k: int = 32) -> dict[str, object]:
    """Ratios ours / best peer and the brief's goals ("met", "MISSED", or "tie"), reported, never asserted.
    Speed goals use the median step (robust to bursts of other jobs); the mean-based ratio is kept too."""
    ours = rows.get("ours")
    # The common setting is float32: a peer's bf16 row is its fastest setting, compared with ours in bf16 only.
    peers = {key: r for key, r in rows.items() if key not in OURS and not key.endswith("-bf16")}
    if ours is None or not peers:
        return {}
    best_fvu = min(r["fvu"] for r in peers.values())
    fewest_dead = min(r["dead_fraction"] for r in peers.values())
    out: dict[str, object] = {
        "speed_ratio": ours["median_step_tokens_per_s"] / max(r["median_step_tokens_per_s"] for r in peers.values()),
        "speed_ratio_mean": ours["tokens_per_s"] / max(r["tokens_per_s"] for r in peers.values()),
        "fvu_ratio": ours["fvu"] / best_fvu,
        "rss_ratio": ours["peak_rss_bytes"] / min(r["peak_rss_bytes"] for r in peers.values()),
    }

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    if "ours-bf16" in rows:  # outside the float32 setting: its ratios are reported, not judged
        bf = rows["ours-bf16"]
        out["bf16_speed_ratio"] = bf["median_step_tokens_per_s"] / max(
            r["median_step_tokens_per_s"] for r in peers.values())
        out["bf16_fvu_ratio"] = bf["fvu"] / best_fvu
        for peer in ("sparsify", "saelens"):  # each peer at its fastest setting (float32 or its own bf16)
            settings = [r for key, r in rows.items() if key in (peer, f"{peer}-bf16")]
            if settings:
                fastest = max(settings, key=lambda r: r["median_step_tokens_per_s"])
                out[f"bf16_vs_{peer}_fastest"] = bf["median_step_tokens_per_s"] / fastest["median_step_tokens_per_s"]
                out[f"bf16_fvu_vs_{peer}_fastest"] = bf["fvu"] / fastest["fvu"]
        if arch == "topk" and "bf16_vs_sparsify_fastest" in out:
            out["goal_bf16_3x_sparsify_fvu_no_worse"] = verdict(
                out["bf16_vs_sparsify_fastest"] >= 3.0 and out["bf16_fvu_vs_sparsify_fastest"] <= 1.0)

    if arch == "topk":
        out["goal_speed_2x"] = verdict(out["speed_ratio"] >= 2.0)
        out["goal_fvu"] = verdict(ours["fvu"] <= best_fvu)
        tie = ours["dead_fraction"] == fewest_dead == 0.0  # nothing fewer than none
        out["goal_fewer_dead"] = "tie" if tie else verdict(ours["dead_fraction"] < fewest_dead)
    else:
        out["goal_fvu"] = verdict(ours["fvu"] <= best_fvu)
        out["goal_l0_within_10pct"] = verdict(abs(ours["l0"] - k) <= 0.1 * k)
        out["goal_dead_under_5pct"] = verdict(ours["dead_fraction"] < 0.05)
    return out


def markdown(table: dict[str, dict[str, dict]], verdicts: dict[str, dict]) -> str:
    lines = []
    for arch, rows in table.items():
        lines += [f"**{arch}**", "",
                  "| implementation | tokens/s (median step) | tokens/s (mean) | FVU held-out | L0 | dead | "
                  "peak RSS | peak RssAnon |", "|---|---|---|---|---|---|---|---|"]
        for r in rows.values():
            lines.append(f"| {r['impl']} | {r['median_step_tokens_per_s']:,.0f} | {r['tokens_per_s']:,.0f} | "
                         f"{r['fvu']:.4f} | {r['l0']:.1f} | {100 * r['dead_fraction']:.1f}% | "
                         f"{r['peak_rss_bytes'] / 1e9:.2f} GB | {r['sampled_peak_rss_anon_bytes'] / 1e9:.2f} GB |")
        v = verdicts.get(arch)
        if v:
            lines += ["", "ours / best peer: " + ", ".join(
                f"{k} {v[k]:.2f}" for k in ("speed_ratio", "speed_ratio_mean", "fvu_ratio", "rss_ratio",
                                            "bf16_speed_ratio", "bf16_fvu_ratio", "bf16_vs_sparsify_fastest",
                                            "bf16_fvu_vs_sparsify_fastest", "bf16_vs_saelens_fastest",
                                            "bf16_fvu_vs_saelens_fastest") if k in v)
                + "; goals: " + ", ".join(f"{k[5:]} {v[k]}" for k in v if k.startswith("goal_"))]
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", default="cache/minilm-default")
    p.add_argument("--layer", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=None, help="only the first N batches (default: one pass)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--arch", nargs="+", choices=list(PLAN), default=list(PLAN))
    p.add_argument("--impl", nargs="+", choices=list(WORKERS), default=[w for w in WORKERS if w != "ours-bf16"],
                   help="implementations (default: all but ours-bf16, which is outside the float32 setting)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lr", type=float, default=DEFAULT_LR,
                   help="Adam lr for every implementation (constant, no warm-up); default: the common setting's")
    p.add_argument("--work", type=Path, default=WORK)
    p.add_argument("--peer-python", type=Path, default=PEER_PYTHON)
    p.add_argument("--reuse-stream", action="store_true", help="keep an existing stream file (same settings)")
    p.add_argument("--summarize", type=Path, default=None, metavar="RESULTS_JSON",
                   help="only print the summary of an earlier run's results.json")
    p.add_argument("--reuse-freed-memory", action="store_true",
                   help="run every worker with glibc settings that keep freed memory (MALLOC_ENV)")
    p.add_argument("--sequential", action="store_true",
                   help="run the implementations one after the other instead of taking turns step by step")
    return p.parse_args(argv)


def summarize(path: Path) -> None:
    doc = json.loads(path.read_text())
    table = aggregate(doc["runs"], doc["stream"]["batch_size"])
    print(markdown(table, {arch: goals(arch, rows) for arch, rows in table.items()}))
    print(f"{doc['command']}; {doc['started']} to {doc['finished']}; load {doc['load_start'][0]:.2f} -> "
          f"{doc['load_end'][0]:.2f}; code {doc.get('code')}")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.summarize is not None:
        summarize(a.summarize)
        return 0
    if any(i != "ours" for i in a.impl) and not a.peer_python.is_file():
        sys.exit(f"{a.peer_python} not found: run `bash bench/setup_peers.sh` first (or pass --impl ours)")
    started, load0, code0 = time.strftime("%Y-%m-%d %H:%M:%S"), os.getloadavg(), code_fingerprint()
    if a.reuse_stream:
        from streamfile import load_meta
        meta = load_meta(a.work)
    else:
        t = time.perf_counter()
        meta = write_stream(a.cache, a.layer, a.batch_size, a.steps, a.work)
        print(f"stream: {meta.train_rows:,} train rows in {meta.n_batches} batches, {meta.heldout_rows:,} held-out "
              f"rows, scale {meta.scale:.4f} ({time.perf_counter() - t:.0f} s)", flush=True)
    extra_env = MALLOC_ENV if a.reuse_freed_memory else None
    results = run_all(a.arch, a.impl, a.repeats, a.work, a.threads, a.peer_python, not a.sequential, extra_env, a.lr)
    table = aggregate(results, meta.batch_size)
    verdicts = {arch: goals(arch, rows) for arch, rows in table.items()}
    import torch

    command = " ".join([".venv/bin/python", "bench/bench_peers.py", *sys.argv[1:]])
    code1 = code_fingerprint()
    if code1 != code0:
        print(f"WARNING: the project code changed during the run ({code0} -> {code1}): rerun for clean figures")
    doc = {"started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "load_start": load0,
           "load_end": os.getloadavg(), "command": command, "code": {"start": code0, "end": code1},
           "extra_env": extra_env, "lr": a.lr, "torch": torch.__version__,
           "stream": {"train_rows": meta.train_rows, "heldout_rows": meta.heldout_rows, "batch_size": meta.batch_size,
                      "batches": meta.n_batches, "scale": meta.scale, "source": meta.source},
           "summary": table, "goals": verdicts, "runs": results}
    out = a.work / ("results.json" if a.lr == DEFAULT_LR else f"results-lr{a.lr:g}.json")
    out.write_text(json.dumps(doc, indent=2))
    print(markdown(table, verdicts))
    print(f"load average: start {load0[0]:.2f}, end {os.getloadavg()[0]:.2f}; code {code0}"
          f"{'' if code1 == code0 else ' -> ' + code1}; details in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
