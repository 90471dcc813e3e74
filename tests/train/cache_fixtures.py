"""Small synthetic caches written with `cache.CacheWriter`, for the tests of train/ (and any other).

Rows are laid out as the harvester lays them out: sequences of `seq_len` rows (sequence ids count
from 0 within each split), grouped into windows of `window_seqs` sequences whose rows are shuffled
together (seeded) before they are written; one window is one producer chunk.

Three kinds of content (`content=`):
- "ids": every value says where it came from. For a train row, x[:, 0] = its global row id (its
  index in the split, in cache order: shard by shard), x[:, 1] = the layer (block number),
  x[:, 2] = its sequence id, x[:, 3] = its position; other columns 0. Every train value is >= 0.
  Every value of every held-out row is HELDOUT_MARK (< 0). Needs d_model >= 4 and float32 (ids must
  be exact).
- "sparse": learnable data. Layer number i (0-based in `layers`) is (i + 1) * codes_i @ dictionary:
  a shared random unit dictionary [n_features, d_model], `active` features per row with magnitudes
  in [0.5, 1.5), an independent code per layer, plus `noise` * N(0, 1). Held-out rows come from the
  same distribution.
- "gaussian": N(0, 1) values, cheapest to make (benchmarks).

API (kept stable for other engineers): `write_cache(path, ...) -> SyntheticCache`, `decode_ids(x)`,
`harvest_order(...)`, HELDOUT_MARK, ID_COLUMNS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

import cache

HELDOUT_MARK = -1.0
ID_COLUMNS = 4  # row id, layer, sequence, position
CONTENTS = ("ids", "sparse", "gaussian")


@dataclass(frozen=True)
class SyntheticCache:
    """What `write_cache` wrote (`dictionary` only for content="sparse")."""

    path: Path
    layers: list[int]
    d_model: int
    n_train: int
    n_heldout: int
    seq_len: int
    window_seqs: int
    dictionary: Tensor | None = None

    @property
    def window_rows(self) -> int:
        return self.seq_len * self.window_seqs


def harvest_order(n_rows: int, seq_len: int, window_seqs: int, window: int, seed: int) -> tuple[Tensor, Tensor]:
    """(sequence [m], position [m]) of the rows of window `window`, in written (shuffled) order.

    The split has `n_rows` rows in sequences of `seq_len` (the last one may be short); window w holds
    sequences [w * window_seqs, (w + 1) * window_seqs); m is 0 past the end of the split.
    """
    lo = window * window_seqs * seq_len
    hi = min(n_rows, lo + window_seqs * seq_len)
    rows = torch.arange(lo, max(lo, hi))
    g = torch.Generator().manual_seed(seed * 1_000_003 + window)
    rows = rows[torch.randperm(len(rows), generator=g)]
    return rows // seq_len, (rows % seq_len).to(torch.int32)


def decode_ids(x: Tensor) -> dict[str, Tensor]:
    """For content="ids": x [..., d] -> {"row", "layer", "sequence", "position"}, int64 [...]."""
    return {name: x[..., i].round().long() for i, name in enumerate(("row", "layer", "sequence", "position"))}


def _check(content: str, d_model: int, dtype: str, n_train: int) -> None:
    if content not in CONTENTS:
        raise ValueError(f"content must be one of {CONTENTS}, got {content!r}")
    if content == "ids" and d_model < ID_COLUMNS:
        raise ValueError(f"content='ids' needs d_model >= {ID_COLUMNS}, got {d_model}")
    if content == "ids" and dtype != "float32" and n_train > 256:
        raise ValueError("content='ids' needs dtype='float32' (row ids above 256 are not exact in 16 bits)")


class _Values:
    """Makes the activations of one window, for every layer."""

    def __init__(self, content: str, layers: list[int], d_model: int, n_features: int, active: int,
                 noise: float, seed: int) -> None:
        self.content, self.layers, self.d, self.active, self.noise = content, layers, d_model, active, noise
        self.g = torch.Generator().manual_seed(seed)
        self.dictionary = None
        if content == "sparse":
            w = torch.randn(n_features, d_model, generator=self.g)
            self.dictionary = w / w.norm(dim=1, keepdim=True)

    def make(self, split: str, first_row: int, seq: Tensor, pos: Tensor) -> dict[int, Tensor]:
        n = len(seq)
        if self.content == "ids":
            return {layer: self._ids(split, first_row, seq, pos, layer) for layer in self.layers}
        if self.content == "gaussian":
            return {layer: torch.randn(n, self.d, generator=self.g) for layer in self.layers}
        out = {}
        for i, layer in enumerate(self.layers):
            scores = torch.rand(n, len(self.dictionary), generator=self.g)
            idx = scores.topk(self.active, dim=1).indices
            mags = 0.5 + torch.rand(n, self.active, generator=self.g)
            codes = torch.zeros(n, len(self.dictionary)).scatter_(1, idx, mags)
            x = (i + 1) * (codes @ self.dictionary)
            out[layer] = x + self.noise * torch.randn(n, self.d, generator=self.g) if self.noise else x
        return out

    def _ids(self, split: str, first_row: int, seq: Tensor, pos: Tensor, layer: int) -> Tensor:
        n = len(seq)
        if split == "heldout":
            return torch.full((n, self.d), HELDOUT_MARK)
        x = torch.zeros(n, self.d)
        x[:, 0] = torch.arange(first_row, first_row + n, dtype=torch.float32)
        x[:, 1] = float(layer)
        x[:, 2] = seq.float()
        x[:, 3] = pos.float()
        return x


def _write_split(writer: cache.CacheWriter, split: str, n_rows: int, values: _Values, seq_len: int,
                 window_seqs: int, seed: int) -> None:
    written, window = 0, 0
    while written < n_rows:
        seq, pos = harvest_order(n_rows, seq_len, window_seqs, window, seed)
        acts = values.make(split, written, seq, pos)
        doc = seq // 2 + (10**9 if split == "heldout" else 0)  # two sequences per document; no shared docs
        writer.append(split, chunk=window, offset=0, acts=acts, token_ids=((seq * 31 + pos) % 1000).to(torch.int32),
                      sequence=seq, position=pos, document=doc)
        written += len(seq)
        window += 1


def write_cache(path: str | Path, *, content: str = "ids", n_train: int = 2048, n_heldout: int = 256,
                layers: tuple[int, ...] | list[int] = (0, 1, 2), d_model: int = 8, seq_len: int = 16,
                window_seqs: int = 8, shard_rows: int = 500, dtype: str = "float32",
                backend: str = "safetensors", seed: int = 0, complete: bool = True, n_features: int = 256,
                active: int = 4, noise: float = 0.0, identity: dict | None = None,
                metadata: dict | None = None) -> SyntheticCache:
    """Write a synthetic cache at `path` (a new or empty folder) and return what it holds.

    complete=False leaves it as a killed harvest would: every row flushed into shards, the manifest
    still saying complete=False (so `cache.open` refuses it without allow_incomplete=True).
    """
    _check(content, d_model, dtype, n_train)
    layers = list(layers)
    values = _Values(content, layers, d_model, n_features, active, noise, seed)
    ident = identity if identity is not None else {"synthetic": content, "seed": seed, "d_model": d_model}
    meta = {"model": "synthetic", "text_source": f"synthetic:{content}", "seq_len": seq_len,
            "shuffle_window": window_seqs, "seed": seed, **(metadata or {})}
    writer = cache.CacheWriter(path, layers=layers, d_model=d_model, dtype=dtype, shard_rows=shard_rows,
                               identity=ident, metadata=meta, backend=backend)
    try:
        _write_split(writer, "train", n_train, values, seq_len, window_seqs, seed)
        _write_split(writer, "heldout", n_heldout, values, seq_len, window_seqs, seed + 7919)
        if complete:
            writer.finish()
        else:
            writer.flush()
    finally:
        writer.close()
    return SyntheticCache(Path(path), layers, d_model, n_train, n_heldout, seq_len, window_seqs,
                          values.dictionary)
