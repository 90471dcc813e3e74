"""python -m cache info PATH | verify PATH | convert SRC DST --store-dtype D.
Exit codes: 0 ok, 1 problems, 2 usage or not a cache."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from durable import lock as durable_lock

from . import encoding
from .convert import convert, store_dtypes
from .manifest import ManifestError
from .reader import Cache, open_cache
from .verify import NotACacheError, verify_report


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e7 else f"{n / 1e6:.3f} MB"


def _model(c: Cache) -> str:
    for source in (c.metadata, c.identity):
        for key in ("model", "model_id", "model_name"):
            if key in source:
                rev = source.get("revision") or source.get("model_revision")
                return f"{source[key]}" + (f" @ {rev}" if rev else "")
    return "(not recorded)"


def _stats_lines(c: Cache) -> list[str]:
    lines = []
    for split in c.splits:
        if c.num_rows(split) == 0:
            continue
        lines.append(f"statistics ({split}): layer, mean norm, rms norm, |mean|"
                     + (", norm_scale" if split == "train" else ""))
        for layer in c.layers:
            s = c.stats(split, layer)
            row = (f"  {layer:>5}  {s.mean_norm:12.5g}  {np.sqrt(s.mean_sq_norm):12.5g}  "
                   f"{np.linalg.norm(s.mean):12.5g}")
            lines.append(row + (f"  {c.norm_scale(layer):10.5g}" if split == "train" else ""))
    return lines


def info(path: str) -> int:
    c = open_cache(path, allow_incomplete=True)
    tokens = sum(c.num_rows(s) for s in c.splits)
    size = c.size_on_disk()
    lines = [
        f"cache      {c.path}",
        f"model      {_model(c)}",
        f"complete   {'yes' if c.complete else 'NO (rerun make harvest to finish it)'}",
        f"layers     {c.layers}",
        f"d_model    {c.d_model}",
        f"dtype      {c.manifest['dtype']}" + (" (int8 codes, float32 scales per row and per column of each shard; "
                                                 "read decoded to float32)" if c.encoded else ""),
        f"backend    {c.backend}" + (f" ({c.manifest.get('zarr_compression')})"
                                     if c.manifest.get("zarr_compression") else ""),
        "tokens     " + ", ".join(f"{s} {c.num_rows(s):,}" for s in c.splits),
        "shards     " + ", ".join(f"{s} {len(c.shards(s))}" for s in c.splits)
        + f" (shard_rows {c.shard_rows})",
        f"size       {_gb(size)} on disk" + (f", {size / tokens:.1f} bytes/token" if tokens else ""),
    ]
    print("\n".join(lines + _stats_lines(c)))
    return 0


def verify_cmd(path: str) -> int:
    t0 = time.perf_counter()
    report = verify_report(path)
    for w in report.warnings:
        print(f"warning: {w}")
    for p in report.problems:
        print(f"BAD: {p}")
    secs = time.perf_counter() - t0
    rate = report.bytes_checked / secs / 1e9 if secs > 0 else 0.0
    verdict = f"{len(report.problems)} problem(s)" if report.problems else "ok"
    print(f"{verdict}: {report.shards_checked} shards, {_gb(report.bytes_checked)} hashed and checked in {secs:.2f} s "
          f"({rate:.2f} GB/s)")
    return 1 if report.problems else 0


def convert_cmd(args: argparse.Namespace) -> int:
    s = convert(args.src, args.dst, store_dtype=args.store_dtype, backend=args.backend,
                zarr_compression=args.zarr_compression, shard_rows=args.shard_rows, overwrite=args.overwrite)
    tokens = sum(s.rows.values())
    print(f"converted: {s.path} ({args.store_dtype}), " + ", ".join(f"{k} {v:,}" for k, v in s.rows.items())
          + f" rows ({s.new_rows:,} written now), verified")
    print(f"  bytes on disk: {s.bytes_on_disk:,} ({s.bytes_on_disk / max(tokens, 1):.1f} per token; "
          f"{s.bytes_on_disk / max(s.source_bytes, 1):.3f} of the source); {s.seconds:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cache", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="summary of a cache").add_argument("path")
    sub.add_parser("verify", help="check all that makes a cache valid (cache/FORMAT.md 5.1)").add_argument("path")
    conv = sub.add_parser("convert", help="rewrite a cache in another store dtype (and backend); resumable")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--store-dtype", required=True, choices=store_dtypes(),
                      help=f"the new store dtype ({encoding.INT8}: 8-bit codes with scales, cache/encoding.py)")
    conv.add_argument("--backend", choices=["safetensors", "zarr"], help="default: the source's")
    conv.add_argument("--zarr-compression", choices=["zstd", "blosc", "gzip"], help="backend zarr only")
    conv.add_argument("--shard-rows", type=int, help="default: the source's")
    conv.add_argument("--overwrite", action="store_true", help="replace a different cache at DST")
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            return convert_cmd(args)
        return info(args.path) if args.command == "info" else verify_cmd(args.path)
    except (NotACacheError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ManifestError, ValueError, durable_lock.LockHeld) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
