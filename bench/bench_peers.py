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
from streamfile import StreamMeta, write_meta, write_split  # noqa: E402

WORK = ROOT / "bench" / "_work" / "peers"
PEER_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
WORKERS = {"ours": "ours_worker.py", "saelens": "saelens_worker.py", "sparsify": "sparsify_worker.py"}
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

    def __init__(self, impl: str, arch: str, tag: str, work: Path, threads: int, peer_python: Path, gated: bool):
        self.impl, self.arch, self.tag = impl, arch, tag
        self.out, self.log = work / "results" / f"{tag}.json", work / "logs" / f"{tag}.log"
        for folder in (self.out.parent, self.log.parent):
            folder.mkdir(parents=True, exist_ok=True)
        self.out.unlink(missing_ok=True)
        python = Path(sys.executable) if impl == "ours" else peer_python
        cmd = [str(python), str(PEERS / WORKERS[impl]), "--arch", arch, "--work", str(work), "--out", str(self.out),
               "--threads", str(threads)]
        fds: tuple[int, ...] = ()
        self.go = self.ready = None
        if gated:
            go_r, self.go = os.pipe()
            self.ready, ready_w = os.pipe()
            cmd += ["--gate", f"{go_r},{ready_w}"]
            fds = (go_r, ready_w)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
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
              lockstep: bool) -> list[dict]:
    """Train `arch` with each implementation: together in lockstep, or one after the other."""
    stamp, code = time.strftime("%H:%M:%S"), code_fingerprint()  # what the workers import now
    print(f"[{stamp}] {arch}, repeat {r}: {', '.join(impls)} (load {os.getloadavg()[0]:.1f}) ...", flush=True)
    if lockstep:
        workers = [Worker(i, arch, f"{i}-{arch}-r{r}", work, threads, peer_python, True) for i in impls]
        run_lockstep(workers)
        docs = [w.finish() for w in workers]
    else:
        docs = [Worker(i, arch, f"{i}-{arch}-r{r}", work, threads, peer_python, False).finish() for i in impls]
    for doc in docs:
        print(f"    {doc['impl']:16s} {doc['tokens_per_s']:8,.0f} tok/s, FVU {doc['fvu']:.4f}, L0 {doc['l0']:.1f}, "
              f"dead {100 * doc['dead_fraction']:.1f}%, peak RSS {doc['peak_rss_bytes'] / 1e9:.2f} GB", flush=True)
    return [{"repeat": r, "code": code, **doc} for doc in docs]


def run_all(arches: list[str], impls: list[str], repeats: int, work: Path, threads: int, peer_python: Path,
            lockstep: bool) -> list[dict]:
    results = []
    for r in range(repeats):
        for arch in arches:
            order = [i for i in PLAN[arch] if i in impls]
            order = order if r % 2 == 0 else order[::-1]  # sequential mode: alternate who goes first
            results += run_group(order, arch, r, work, threads, peer_python, lockstep)
    return results


def code_fingerprint() -> str:
    """A hash of the project code a run of ours executes (sae/, train/, cache/, settings/, configs/):
    other engineers change it while benchmarks run, and results from different code must not mix."""
    import hashlib

    h = hashlib.sha256()
    for folder in ("sae", "train", "cache", "settings", "configs"):
        for f in sorted((ROOT / folder).rglob("*")):
            if f.is_file() and f.suffix in (".py", ".yaml"):
                h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


# ---- 3. summary ---------------------------------------------------------------------------------------
def aggregate(results: list[dict]) -> dict[str, dict[str, dict]]:
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
            table[arch][key] = {"impl": runs[0]["impl"], "repeats": len(runs), **med, "spread": spread,
                                "all_tokens_per_s": [r["tokens_per_s"] for r in runs],
                                "threshold": runs[0].get("threshold"), "steps": runs[0]["steps"],
                                "tokens": runs[0]["tokens"], "own_report": runs[0].get("own_report"),
                                "code": sorted({r.get("code", "?") for r in runs})}
    return table


def goals(arch: str, rows: dict[str, dict], k: int = 32) -> dict[str, object]:
    """Ratios ours / best peer and the goals of the brief (reported, never asserted)."""
    ours = rows.get("ours")
    peers = {key: r for key, r in rows.items() if key != "ours"}
    if ours is None or not peers:
        return {}
    fastest = max(r["tokens_per_s"] for r in peers.values())
    best_fvu = min(r["fvu"] for r in peers.values())
    fewest_dead = min(r["dead_fraction"] for r in peers.values())
    out: dict[str, object] = {
        "speed_ratio": ours["tokens_per_s"] / fastest, "fvu_ratio": ours["fvu"] / best_fvu,
        "dead_ours": ours["dead_fraction"], "dead_best_peer": fewest_dead,
        "rss_ratio": ours["peak_rss_bytes"] / min(r["peak_rss_bytes"] for r in peers.values()),
    }
    if arch == "topk":
        out["goal_speed_2x"] = out["speed_ratio"] >= 2.0
        out["goal_fvu"] = ours["fvu"] <= best_fvu
        out["goal_fewer_dead"] = ours["dead_fraction"] < fewest_dead
    else:
        out["goal_fvu"] = ours["fvu"] <= best_fvu
        out["goal_l0_within_10pct"] = abs(ours["l0"] - k) <= 0.1 * k
        out["goal_dead_under_5pct"] = ours["dead_fraction"] < 0.05
    return out


def markdown(table: dict[str, dict[str, dict]], verdicts: dict[str, dict]) -> str:
    lines = []
    for arch, rows in table.items():
        lines += [f"**{arch}**", "",
                  "| implementation | tokens/s (median) | FVU held-out | L0 | dead | peak RSS | peak RssAnon |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows.values():
            lines.append(f"| {r['impl']} | {r['tokens_per_s']:,.0f} | {r['fvu']:.4f} | {r['l0']:.1f} | "
                         f"{100 * r['dead_fraction']:.1f}% | {r['peak_rss_bytes'] / 1e9:.2f} GB | "
                         f"{r['sampled_peak_rss_anon_bytes'] / 1e9:.2f} GB |")
        v = verdicts.get(arch)
        if v:
            lines += ["", "ratios ours / best peer: " + ", ".join(
                f"{k} {v[k]:.2f}" for k in ("speed_ratio", "fvu_ratio", "rss_ratio")) + "; goals: " + ", ".join(
                f"{k[5:]} {'met' if v[k] else 'MISSED'}" for k in v if k.startswith("goal_"))]
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
    p.add_argument("--impl", nargs="+", choices=list(WORKERS), default=list(WORKERS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=WORK)
    p.add_argument("--peer-python", type=Path, default=PEER_PYTHON)
    p.add_argument("--reuse-stream", action="store_true", help="keep an existing stream file (same settings)")
    p.add_argument("--sequential", action="store_true",
                   help="run the implementations one after the other instead of taking turns step by step")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
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
    results = run_all(a.arch, a.impl, a.repeats, a.work, a.threads, a.peer_python, not a.sequential)
    table = aggregate(results)
    verdicts = {arch: goals(arch, rows) for arch, rows in table.items()}
    import torch

    command = " ".join([".venv/bin/python", "bench/bench_peers.py", *sys.argv[1:]])
    code1 = code_fingerprint()
    if code1 != code0:
        print(f"WARNING: the project code changed during the run ({code0} -> {code1}): rerun for clean figures")
    doc = {"started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "load_start": load0,
           "load_end": os.getloadavg(), "command": command, "code": {"start": code0, "end": code1},
           "torch": torch.__version__, "stream": {"train_rows": meta.train_rows, "heldout_rows": meta.heldout_rows,
                                                 "batches": meta.n_batches, "scale": meta.scale, "source": meta.source},
           "summary": table, "goals": verdicts, "runs": results}
    (a.work / "results.json").write_text(json.dumps(doc, indent=2))
    print(markdown(table, verdicts))
    print(f"load average: start {load0[0]:.2f}, end {os.getloadavg()[0]:.2f}; code {code0}"
          f"{'' if code1 == code0 else ' -> ' + code1}; details in {a.work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
