"""The peer benchmark's data files: the exact training row stream and the held-out rows.

Every implementation must see the same rows in the same order, so bench_peers.py writes, once per
run, the rows our trainer's loader yields (one epoch, in batch order) and the held-out rows, as raw
little-endian float32 matrices, plus a JSON description. Workers in either venv read them with numpy
only (no project import, nothing unpickled), through a read-only memory map, as our loader reads the
cache.

    <work>/stream.json   {"format_version", "d", "train_rows", "heldout_rows", "batch_size", "scale", ...}
    <work>/train.f32     [train_rows, d] float32, batch b = rows [b*B, (b+1)*B)
    <work>/heldout.f32   [heldout_rows, d] float32

Values are raw activations; `scale` is the fixed scalar (sqrt(d) / mean norm on the train split)
that every implementation multiplies them by.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

FORMAT_VERSION = 1
META_FILE = "stream.json"
SPLIT_FILES = {"train": "train.f32", "heldout": "heldout.f32"}
DTYPE = np.dtype("<f4")


@dataclass(frozen=True)
class StreamMeta:
    d: int
    train_rows: int
    heldout_rows: int
    batch_size: int
    scale: float  # multiply raw rows by this: E||x * scale|| = sqrt(d) on the train split
    layer: int
    cache: str
    source: str  # how the train order was produced (for the report)
    epoch_batches: int  # batches in one epoch of the loader (n_batches is less when the stream is cut short)
    format_version: int = FORMAT_VERSION

    @property
    def n_batches(self) -> int:
        return math.ceil(self.train_rows / self.batch_size)

    def batch_rows(self) -> list[int]:
        """Rows of each batch in order (the last one may be short)."""
        return [min(self.batch_size, self.train_rows - b * self.batch_size) for b in range(self.n_batches)]

    def rows(self, split: str) -> int:
        return {"train": self.train_rows, "heldout": self.heldout_rows}[split]


def write_split(work: Path, split: str, chunks: Iterable[np.ndarray], d: int) -> int:
    """Write float32 rows [n, d] chunk by chunk to <work>/<split file> (atomically) -> rows written."""
    target = work / SPLIT_FILES[split]
    tmp = target.with_name(target.name + ".tmp")
    rows = 0
    with open(tmp, "wb") as fh:
        for chunk in chunks:
            chunk = np.ascontiguousarray(chunk, dtype=DTYPE)
            if chunk.ndim != 2 or chunk.shape[1] != d:
                raise ValueError(f"{split}: chunk of shape {chunk.shape}, expected [n, {d}]")
            fh.write(chunk.tobytes())
            rows += chunk.shape[0]
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(target)
    return rows


def write_meta(work: Path, meta: StreamMeta) -> None:
    """Written last: a folder without a valid stream.json is not a usable stream."""
    tmp = work / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(asdict(meta), indent=2))
    tmp.replace(work / META_FILE)


def load_meta(work: Path) -> StreamMeta:
    """Read and validate <work>/stream.json and the sizes of the files it describes."""
    path = work / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run bench/bench_peers.py, which writes it first")
    doc = json.loads(path.read_text())
    if not isinstance(doc, dict) or doc.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: not a stream description of format_version {FORMAT_VERSION}; rerun bench_peers.py")
    types = {"d": int, "train_rows": int, "heldout_rows": int, "batch_size": int, "scale": float, "layer": int,
             "cache": str, "source": str, "epoch_batches": int, "format_version": int}
    if set(doc) != set(types):
        raise ValueError(f"{path}: keys {sorted(doc)}, expected {sorted(types)}")
    for key, kind in types.items():
        value = doc[key]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else \
            isinstance(value, kind) and not isinstance(value, bool)
        if not ok:
            raise ValueError(f"{path}: {key}={value!r} is not a {kind.__name__}")
    meta = StreamMeta(**{**doc, "scale": float(doc["scale"])})
    if min(meta.d, meta.train_rows, meta.heldout_rows, meta.batch_size) < 1 or not meta.scale > 0:
        raise ValueError(f"{path}: sizes and scale must be positive, got {doc}")
    for split in SPLIT_FILES:
        f = work / SPLIT_FILES[split]
        want = meta.rows(split) * meta.d * DTYPE.itemsize
        size = f.stat().st_size if f.is_file() else None
        if size != want:
            raise ValueError(f"{f}: {size} bytes, expected {want} from {path}; rerun bench_peers.py")
    return meta


def open_split(work: Path, meta: StreamMeta, split: str) -> np.memmap:
    """Read-only memory map of one split: [rows, d] float32 (load_meta has checked its size)."""
    return np.memmap(work / SPLIT_FILES[split], dtype=DTYPE, mode="r", shape=(meta.rows(split), meta.d))


def train_batches(work: Path, meta: StreamMeta, on_request: Callable[[], None] = lambda: None,
                  scale: float = 1.0) -> Iterator[torch.Tensor]:
    """The training batches in order, as float32 tensors [B, d] times `scale` (one pass).
    `on_request()` is called each time a batch is asked for, i.e. when the previous step ended."""
    rows = open_split(work, meta, "train")
    for b in range(meta.n_batches):
        on_request()
        x = torch.from_numpy(np.array(rows[b * meta.batch_size:(b + 1) * meta.batch_size]))
        yield x.mul_(scale) if scale != 1.0 else x


def heldout_chunks(work: Path, meta: StreamMeta, chunk_rows: int = 4096) -> Iterator[torch.Tensor]:
    """The held-out rows, raw, as float32 tensors of up to `chunk_rows` rows."""
    rows = open_split(work, meta, "heldout")
    for start in range(0, meta.heldout_rows, chunk_rows):
        yield torch.from_numpy(np.array(rows[start:start + chunk_rows]))
