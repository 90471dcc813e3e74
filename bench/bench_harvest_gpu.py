"""Stage 1 on a GPU: the harvest against the bare forward and against the machine's own disk, in one call.

The random-init Qwen3-1.7B shape (bf16 on CUDA; no download, no tokenizer), 1 layer (block 6) and 15
layers (blocks 6:21), on the same synthetic token batches (sequences of 128, batch 64, shuffle windows
of 256 sequences, shards of 16,384 rows), each figure measured in this run:
  forward   the bare forward to the deepest harvested block (early stop, no capture);
  harvest   the whole pipeline into a cache under --workdir (on the disk), `finish` included;
  tmpfs     the same pipeline into /dev/shm when it has room: the pipeline's ceiling without the disk;
  disk      safetensors.save_file + fsync of shards of the same shapes and bytes under --workdir.
ratio = harvest tokens/s / min(forward tokens/s, disk bytes/s / bytes per token): goal >= 0.9.

Checks, also on the device: the cached rows equal a plain hooked forward bit for bit; the per-shard
float64 statistics (computed on the GPU) are within 1e-6 x mean norm of numpy float64 on the rows read
back; a writer fed CUDA rows, interrupted (closed, as after a crash) and resumed writes the same shards
and statistics as an uninterrupted one, bit for bit. Each part records its error instead of stopping
the run; the exit code is 1 if a check failed or a part raised.

    python bench/bench_harvest_gpu.py --out $OUT/harvest_gpu.json              # GPU: about 2 minutes
    .venv/bin/python bench/bench_harvest_gpu.py --device cpu --shape tiny       # the CPU rehearsal
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_harvest import QWEN3_17B, _plans, check_rows, synthetic_sequences, time_forward, time_harvest  # noqa: E402
from bench_writer import save_file_fsync  # noqa: E402

import cache  # noqa: E402
from cache import shardio  # noqa: E402
from harvest.model import LoadedModel, parse_layers, wrap_model  # noqa: E402

# A Qwen3 of the same depth (28 blocks) and layer numbers, small enough for a CPU rehearsal.
TINY = {**QWEN3_17B, "vocab_size": 2048, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16}


def build(shape: str, device: torch.device) -> LoadedModel:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = Qwen3Config(**(QWEN3_17B if shape == "qwen3-1.7b" else TINY), attn_implementation="sdpa")
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    return wrap_model(model.eval(), path=f"{shape}-random", causal=True)


def _disk_shards(rows: dict[str, int], shard_rows: int, n_layers: int, d: int, dtype: torch.dtype) -> list[dict]:
    """Shards of the harvest's shapes: per split, full shards then the short rest (random values; the
    shards share their layer blocks, which save_file allows across files but not within one)."""
    first = torch.randn(shard_rows, d).to(dtype)
    blocks = [first] + [first.clone() for _ in range(n_layers - 1)]  # the disk does not care what they hold
    out = []
    for n in rows.values():
        for a in range(0, n, shard_rows):
            m = min(shard_rows, n - a)
            s = {f"layer.{i}": b[:m] for i, b in enumerate(blocks)}
            r = torch.arange(m)
            s.update({"token_ids": r.to(torch.int32), "sequence": r.clone(), "position": r.to(torch.int32),
                      "document": r.clone()})
            out.append(s)
    return out


def _tmpfs(nbytes: int) -> Path | None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        return None
    st = os.statvfs(shm)
    return shm / "bench-harvest-gpu" if st.f_bavail * st.f_frsize > 1.3 * nbytes else None


def stats_check(path: Path, layers: list[int], shards: int = 1) -> dict:
    """The first `shards` train shards: their stored float64 sums of the first, middle and last layer
    against numpy float64 on the rows read back."""
    worst = 0.0
    with cache.open(path) as c:
        for info in c.shards("train")[:shards]:
            for layer in sorted({layers[0], layers[len(layers) // 2], layers[-1]}):
                x = c.read("train", info.index, layer).float().numpy().astype(np.float64)
                norms = np.sqrt((x * x).sum(axis=1))
                shard = shardio.open_shard(path / info.name, "safetensors")
                got = {k: shard.get(f"stats.{layer}.{k}").numpy() for k in ("sum", "sumsq", "sumnorm")}
                scale = norms.mean()
                errs = [np.abs(got["sum"] / len(x) - x.mean(axis=0)).max() / scale,
                        abs(float(got["sumnorm"]) / len(x) - scale) / scale,
                        abs(float(got["sumsq"]) / len(x) - (norms ** 2).mean()) / (norms ** 2).mean()]
                worst = max(worst, *(float(e) for e in errs))
    return {"worst_error_over_mean_norm": worst, "within_1e-6": bool(worst <= 1e-6)}


def resume_check(device: torch.device, work: Path, d: int = 2048, n_layers: int = 3) -> dict:
    """Rows on `device` into a writer: uninterrupted, against closed after chunk 4 (buffered rows lost, shards
    in flight committed, as after a crash) and resumed from its cursor. Same shards and statistics expected."""
    kw = dict(layers=list(range(n_layers)), d_model=d, dtype="bfloat16", shard_rows=1024, identity={"check": 1},
              metadata={}, async_write=True)

    def feed(w: cache.CacheWriter, c: int, first: int) -> None:
        g = torch.Generator(device=device).manual_seed(c)
        n = 700 + 37 * c
        acts = {L: torch.randn(n, d, generator=g, device=device).to(torch.bfloat16)[first:] for L in range(n_layers)}
        r = torch.arange(first, n)
        if first < n:
            w.append("train", chunk=c, offset=first, acts=acts, token_ids=r, sequence=r + c * 10_000,
                     position=r % 128, document=r)

    def write(out: Path, stop: int | None) -> dict:
        w = cache.CacheWriter(out, **kw)
        for c in range(8):
            feed(w, c, 0)
            if c == stop:
                w.close()
                w = cache.CacheWriter(out, **kw)
                first_chunk, offset = w.resume_point("train")
                for c2 in range(first_chunk, 8):
                    feed(w, c2, offset if c2 == first_chunk else 0)
                break
        w.finish()
        with cache.open(out) as c:
            return c.manifest

    shutil.rmtree(work, ignore_errors=True)
    try:
        ref, got = write(work / "ref", None), write(work / "resumed", 4)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"shards": len(ref["shards"]["train"]), "identical": ref["shards"] == got["shards"] and
            ref["stats"] == got["stats"]}


def run_layers(lm: LoadedModel, spec: str, args: argparse.Namespace, work: Path) -> dict:
    layers = parse_layers(spec, lm.n_blocks)
    seqs = synthetic_sequences(max(1, args.tokens // args.seq_len), args.seq_len, lm.config.vocab_size, [], [])
    plans = _plans(seqs, args.window, args.batch_size)
    tokens = sum(p.rows for p in plans)
    store = "bfloat16" if lm.dtype == torch.bfloat16 else "float32"
    hv = argparse.Namespace(store_dtype=store, batch_size=args.batch_size, window=args.window,
                            shard_rows=args.shard_rows)
    itemsize = torch.empty(0, dtype=getattr(torch, store)).element_size()
    per_token = len(layers) * lm.d_model * itemsize
    out: dict = {"layers": spec, "n_layers": len(layers), "tokens": tokens, "activation_bytes_per_token": per_token,
                 "activation_bytes": tokens * per_token, "store_dtype": store, "shard_rows": args.shard_rows}
    time_harvest(lm, [q for q in seqs if q.split == "train"][:args.window], layers, hv, None, work / "warm")
    time_forward(lm, plans[:1], max(layers))
    fwd, hvs = [], []
    for rep in range(args.repeats):
        fwd.append(time_forward(lm, plans, max(layers)))
        last = rep == args.repeats - 1
        hvs.append(time_harvest(lm, seqs, layers, hv, "safetensors", work / "h", keep=last)[0])
    out["rows_check"] = check_rows(lm, plans, layers, work / "h", args.batch_size)
    out["stats_check"] = stats_check(work / "h", layers)
    with cache.open(work / "h") as c:
        rows = {s: c.num_rows(s) for s in ("train", "heldout")}
    shutil.rmtree(work / "h", ignore_errors=True)
    tmp = _tmpfs(tokens * per_token)
    if tmp is not None:
        try:
            out["harvest_tmpfs_s"] = time_harvest(lm, seqs, layers, hv, "safetensors", tmp)[0]
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    shards = _disk_shards(rows, args.shard_rows, len(layers), lm.d_model, getattr(torch, store))
    disk = [save_file_fsync(shards, work / "disk") for _ in range(args.repeats)]
    t_fwd, t_hv, t_disk = statistics.median(fwd), statistics.median(hvs), min(disk)
    forward_tps, harvest_tps = tokens / t_fwd, tokens / t_hv
    disk_bps = tokens * per_token / t_disk
    limit = min(forward_tps, disk_bps / per_token)
    out.update({"forward_s": fwd, "harvest_s": hvs, "disk_s": disk, "forward_tokens_per_s": forward_tps,
                "harvest_tokens_per_s": harvest_tps, "disk_GB_per_s": disk_bps / 1e9,
                "disk_tokens_per_s": disk_bps / per_token, "harvest_GB_per_s": harvest_tps * per_token / 1e9,
                "ratio_vs_min_forward_disk": harvest_tps / limit, "ratio_vs_forward": harvest_tps / forward_tps,
                "ratio_vs_disk": harvest_tps / (disk_bps / per_token), "bound": "forward" if forward_tps <= disk_bps /
                per_token else "disk"})
    if "harvest_tmpfs_s" in out:
        out["tmpfs_tokens_per_s"] = tokens / out["harvest_tmpfs_s"]
        out["ratio_tmpfs_vs_forward"] = out["tmpfs_tokens_per_s"] / forward_tps
    if args.int8:  # issue 14: the same harvest stored as int8 (encoded on the device), beside the store dtype above
        hv8 = argparse.Namespace(**{**vars(hv), "store_dtype": "int8"})
        runs = [time_harvest(lm, seqs, layers, hv8, "safetensors", work / "h8") for _ in range(args.repeats)]
        t_8 = statistics.median(r[0] for r in runs)
        out.update({"harvest_int8_s": [r[0] for r in runs], "harvest_int8_tokens_per_s": tokens / t_8,
                    "ratio_int8_vs_store_dtype": t_hv / t_8, "bytes_int8_over_store_dtype": runs[-1][2] / (
                        tokens * per_token)})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--shape", default="qwen3-1.7b", choices=["qwen3-1.7b", "tiny"])
    p.add_argument("--layers", default="6,6:21", help="comma-separated layer specs, each harvested on its own")
    p.add_argument("--tokens", type=int, default=None, help="default: 131072 (qwen3-1.7b), 4096 (tiny)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--window", type=int, default=None, help="sequences per shuffle window (default 256; tiny 8)")
    p.add_argument("--shard-rows", type=int, default=None, help="default 16384 (tiny 512)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-int8", dest="int8", action="store_false", help="skip the int8 harvest (issue 14)")
    p.add_argument("--check-width", type=int, default=2048, help="d_model of the resume check's rows")
    p.add_argument("--workdir", default=str(ROOT / "bench" / "_work" / "harvest_gpu"))
    p.add_argument("--out", default=None, help="JSON file (default: $OUT/harvest_gpu.json when OUT is set)")
    args = p.parse_args()
    tiny = args.shape == "tiny"
    args.tokens = args.tokens or (4096 if tiny else 131072)
    args.window = args.window or (8 if tiny else 256)
    args.shard_rows = args.shard_rows or (512 if tiny else 16384)
    out_path = args.out or (str(Path(os.environ["OUT"]) / "harvest_gpu.json") if os.environ.get("OUT") else None)
    device = torch.device(args.device)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result: dict = {"command": " ".join(sys.argv), "torch": torch.__version__, "device": str(device),
                    "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "cpus": os.cpu_count(), "shape": args.shape, "writer_workers": cache.writer.default_workers(),
                    "runs": {}, "errors": {}}
    ok = True
    try:
        lm = build(args.shape, device)
        result["d_model"], result["n_blocks"] = lm.d_model, lm.n_blocks
        for spec in args.layers.split(","):
            try:
                r = run_layers(lm, spec, args, work)
                result["runs"][spec] = r
                ok &= r["rows_check"]["bit_exact"] and r["stats_check"]["within_1e-6"]
                print(f"| {r['n_layers']} | {r['forward_tokens_per_s']:,.0f} | {r['disk_GB_per_s']:.2f} GB/s = "
                      f"{r['disk_tokens_per_s']:,.0f} | {r['harvest_tokens_per_s']:,.0f} | "
                      f"{r.get('tmpfs_tokens_per_s', float('nan')):,.0f} | {r['ratio_vs_min_forward_disk']:.2f} "
                      f"({r['bound']}-bound) |", flush=True)
            except Exception:
                result["errors"][spec] = traceback.format_exc()
                ok = False
        try:
            result["resume_check"] = resume_check(device, work / "resume", d=args.check_width)
            ok &= result["resume_check"]["identical"]
        except Exception:
            result["errors"]["resume_check"] = traceback.format_exc()
            ok = False
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = time.perf_counter() - t0
    result["ok"] = ok
    text = json.dumps(result, indent=1)
    print(text)
    if out_path:
        Path(out_path).write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
