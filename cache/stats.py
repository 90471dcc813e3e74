"""Per-layer statistics in float64 over the stored values, exact across resumes.

Each shard stores its own sums (sum of rows, sum of squared norms, sum of norms). Split totals are
always the sum of those per-shard sums taken in shard order, so a resumed write, which re-reads the
sums of the shards already on disk, reaches the same bits as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# Rows converted to float64 at a time: bounds the temporary copy to a few MB per layer.
_BLOCK_ROWS = 1024


@dataclass(frozen=True)
class LayerStats:
    """Statistics of one layer over one split. mean: np.float64 [d_model]."""

    count: int
    mean: np.ndarray
    mean_sq_norm: float
    mean_norm: float


@dataclass
class ShardSums:
    """float64 sums over one shard's rows: sum [d], sumsq (of squared norms), sumnorm (of norms)."""

    sum: np.ndarray
    sumsq: float
    sumnorm: float


def _float64(x: torch.Tensor) -> np.ndarray:
    """x (CPU, stored dtype) widened exactly to float64 in numpy: single-threaded, so the background
    writer does not fight the producer for torch's intra-op threads."""
    if x.dtype == torch.bfloat16:
        bits = x.view(torch.int16).numpy().view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).astype(np.float64)
    if x.dtype == torch.float16:
        return x.view(torch.int16).numpy().view(np.float16).astype(np.float64)
    return x.numpy().astype(np.float64)


def shard_sums(x: torch.Tensor) -> ShardSums:
    """Sums over the rows of x: [n, d] in the stored dtype, on CPU. Raises on NaN or inf."""
    n, d = x.shape
    total = np.zeros(d, dtype=np.float64)
    sumsq = 0.0
    sumnorm = 0.0
    for start in range(0, n, _BLOCK_ROWS):
        block = _float64(x[start:start + _BLOCK_ROWS])
        total += block.sum(axis=0)
        sq = np.einsum("ij,ij->i", block, block)
        sumsq += float(sq.sum())
        sumnorm += float(np.sqrt(sq).sum())
    if not (np.isfinite(total).all() and math.isfinite(sumsq)):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(
            f"{bad} non-finite values (NaN/inf) in the rows to store; the model produced them or they "
            "overflow the stored dtype (float16 max 65504): use dtype bfloat16 or float32"
        )
    return ShardSums(total, sumsq, sumnorm)


class SplitStats:
    """Running totals of one split for every layer; add shards in order."""

    def __init__(self, layers: list[int], d_model: int) -> None:
        self.count = 0
        self.sums = {L: ShardSums(np.zeros(d_model, dtype=np.float64), 0.0, 0.0) for L in layers}

    def add(self, rows: int, per_layer: dict[int, ShardSums]) -> None:
        self.count += rows
        for layer, s in per_layer.items():
            acc = self.sums[layer]
            acc.sum = acc.sum + s.sum
            acc.sumsq += s.sumsq
            acc.sumnorm += s.sumnorm

    def to_manifest(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for layer, acc in self.sums.items():
            if self.count == 0:
                out[str(layer)] = {"count": 0, "mean": None, "mean_sq_norm": None, "mean_norm": None}
            else:
                out[str(layer)] = {
                    "count": self.count,
                    "mean": (acc.sum / self.count).tolist(),
                    "mean_sq_norm": acc.sumsq / self.count,
                    "mean_norm": acc.sumnorm / self.count,
                }
        return out


def from_manifest(entry: dict) -> LayerStats:
    """LayerStats from one validated manifest entry; ValueError when the split is empty."""
    if entry["count"] == 0:
        raise ValueError("no rows: statistics are undefined for an empty split")
    return LayerStats(
        count=entry["count"],
        mean=np.asarray(entry["mean"], dtype=np.float64),
        mean_sq_norm=float(entry["mean_sq_norm"]),
        mean_norm=float(entry["mean_norm"]),
    )
