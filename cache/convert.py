"""`python -m cache convert SRC DST --store-dtype D`: rewrite a cache in another store dtype (and backend).

No model runs: every row of SRC is read (decoded when SRC is 8-bit), cast or encoded to D by the ordinary
CacheWriter, and written with the same token fields, in the same order, split by split. So DST holds the
same tokens as SRC, its statistics are of its own stored values (FORMAT.md 4.3), and everything the writer
guarantees holds: checksums computed on the way out, shards committed in order, a crash loses only the
shards in flight.

Resumable: DST's resume cursor of a shard is (SRC shard index, row after its last row in that shard), so a
rerun of the same command continues after the last committed shard. Verified: SRC's shards are hashed
against its manifest as they are first read (a damaged source stops the conversion), and once DST is
complete every shard is hashed again against DST's manifest, and its row counts compared with SRC's.

DST's identity is SRC's with `store_dtype` replaced and `converted_from` added (SRC's store dtype): a
harvest of SRC's settings therefore never resumes or extends a converted cache (its cursors are SRC
shards, not the harvest's windows); a second conversion of the same SRC resumes it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from durable import lock as durable_lock

from . import encoding
from .names import SPLITS, STORED_DTYPES
from .reader import open_cache
from .verify import verify_report
from .writer import CacheWriter

# Rows appended at a time: large enough that per-call costs vanish, small enough to stay in memory.
APPEND_ROWS = 4096


class ConvertError(ValueError):
    """The conversion cannot be done as asked; the message says why and what to do."""


@dataclass(frozen=True)
class ConvertSummary:
    path: str
    rows: dict[str, int]
    new_rows: int
    bytes_on_disk: int
    source_bytes: int
    seconds: float


def store_dtypes() -> list[str]:
    return sorted(STORED_DTYPES) + list(encoding.ENCODED_DTYPES)


def convert(src: str | Path, dst: str | Path, *, store_dtype: str, backend: str | None = None,
            zarr_compression: str | None = None, shard_rows: int | None = None, overwrite: bool = False,
            workers: int | None = None) -> ConvertSummary:
    """Write the rows of cache `src` as a cache at `dst` in `store_dtype` (module docstring).

    backend / shard_rows default to SRC's; zarr_compression applies to backend 'zarr' only."""
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if store_dtype not in store_dtypes():
        raise ConvertError(f"--store-dtype {store_dtype!r} is not a store dtype; use one of {store_dtypes()}")
    if dst.resolve() == src.resolve():
        raise ConvertError(f"{dst} is the source cache; choose another destination folder")
    source_lock = durable_lock.shared(src, "cache")  # no harvest may change SRC while it is read
    try:
        with open_cache(src) as c:
            c.verify_reads = True
            identity = {**c.identity, "store_dtype": store_dtype,
                        "converted_from": c.identity.get("store_dtype", c.manifest["dtype"])}
            metadata = {**c.metadata, "converted": {"source": str(src.resolve()), "source_dtype": c.manifest["dtype"],
                                                    "source_backend": c.backend}}
            writer = CacheWriter(dst, layers=c.layers, d_model=c.d_model, dtype=store_dtype,
                                 shard_rows=shard_rows or c.shard_rows, identity=identity, metadata=metadata,
                                 backend=backend or c.backend, overwrite=overwrite,
                                 zarr_compression=zarr_compression, async_write=True, workers=workers)
            try:
                new_rows = sum(_copy_split(c, writer, split) for split in SPLITS)
                writer.finish()
            finally:
                writer.close()
            source_rows = {s: c.num_rows(s) for s in SPLITS}
            source_bytes = c.size_on_disk()
    finally:
        source_lock.release()
    report = verify_report(dst)
    if report.problems:
        raise ConvertError(f"{dst} failed verification after the conversion: {'; '.join(report.problems)}")
    with open_cache(dst) as out:
        rows = {s: out.num_rows(s) for s in SPLITS}
        size = out.size_on_disk()
    if rows != source_rows:
        raise ConvertError(f"{dst} holds {rows} rows but {src} holds {source_rows}; rerun with --overwrite")
    return ConvertSummary(str(dst), rows, new_rows, size, source_bytes, time.perf_counter() - t0)


def _copy_split(c, writer: CacheWriter, split: str) -> int:
    """Append every row of `split` after the writer's resume cursor; return the rows appended."""
    first, offset = writer.resume_point(split)
    shards = c.shards(split)
    if first > len(shards) or (first < len(shards) and offset > shards[first].rows):
        raise ConvertError(f"{writer.path} does not continue {c.path} (its {split} cursor {(first, offset)} "
                           f"is past the source's shards); rerun with --overwrite")
    done = 0
    for info in shards[first:]:
        start = offset if info.index == first else 0
        for a in range(start, info.rows, APPEND_ROWS):
            b = min(info.rows, a + APPEND_ROWS)
            acts = {L: c.read(split, info.index, L, a, b) for L in c.layers}
            tokens = c.read_tokens(split, info.index, a, b)
            writer.append(split, chunk=info.index, offset=a, acts=acts, **tokens)
            done += b - a
    return done
