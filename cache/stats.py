"""Per-layer float64 statistics of the stored values, within FORMAT.md 2's precision contract, and
bit-identical across resumes.

Each shard stores its own sums (sum of rows, sum of squared norms, sum of norms). Split totals are
always the sum of those per-shard sums taken in shard order, so a resumed write, which re-reads the
sums of the shards already on disk, reaches the same bits as an uninterrupted one.

A shard's sums are computed where its rows are: on the GPU (before the device-to-host copy) when the
producer hands the writer CUDA tensors, on the CPU otherwise. Either way the values are widened
exactly (to float32 within a block of rows on the CPU, to float64 on a GPU), and every sum depends
only on the shard's rows and the kind of device, never on the number of threads or on how the
producer split its appends, so a shard rewritten after a crash on the same kind of device gets the
same bits. The sums of squared norms and of norms are added up from the per-row values by numpy,
whose order of addition is fixed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Values per block of rows. CPU: each torch or numpy call gives up the interpreter lock and must take it
# back, and beside a thread that runs Python (the producer, the committer) every retake can wait for the
# interpreter's switch interval, so blocks are large (2^21 cut those waits 7x against 2^18, bench/RESULTS.md
# "Cache writer", run 6) though they no longer stay in a core's cache. GPU: a handful of kernel launches.
_CPU_BLOCK_ELEMENTS = 1 << 21
# Columns per float32 partial sum of a row's squares (`_row_squares`); rows of squared norm below
# _TINY_SQUARES are summed in float64 instead, where float32 products may have underflowed.
_SQUARES_CHUNK = 128
_TINY_SQUARES = 1e-30
_DEVICE_BLOCK_ELEMENTS = 1 << 24


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


def _block_rows(d: int, device: torch.device) -> int:
    budget = _CPU_BLOCK_ELEMENTS if device.type == "cpu" else _DEVICE_BLOCK_ELEMENTS
    return max(1, budget // max(d, 1))


def host_row_sums(layers: list[list[torch.Tensor]], n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 column sums [len(layers), d] and per-row squared L2 norms [len(layers), n] of CPU rows.

    layers[i]: the pieces of layer i, row blocks [m_k, d] in order (sum m_k = n), in the stored dtype.
    The rows are taken in fixed blocks counted from the first row, whatever the pieces, so the result
    depends on the rows alone. Call it from a thread with one torch intra-op thread (the writer's
    workers): reductions then never split across threads, and the order of additions is fixed.

    The column sums are float32 within a block (each value widened exactly; torch sums a block's
    column pairwise, so the rounding stays near 1e-7 of the values' magnitude), the blocks' sums added
    up in float64: widening every value to float64 first took 1.2-2.4x as long, the writer's largest
    CPU cost beside the disk, for precision no reader needs (FORMAT.md 2 states the bound). Each row's
    squared norm: see `_row_squares`."""
    step = _block_rows(d, torch.device("cpu"))
    n_blocks = -(-n // step)
    block_sums = torch.empty((len(layers), max(n_blocks, 1), d), dtype=torch.float32)
    sq = np.empty((len(layers), n), dtype=np.float64)
    scratch = torch.empty((min(step, max(n, 1)), d), dtype=torch.float32)
    # Few calls per block (see _CPU_BLOCK_ELEMENTS): per-block results go into buffers summed at the end.
    for i, pieces in enumerate(layers):
        whole = pieces[0] if len(pieces) == 1 else None
        # float32 rows in one contiguous piece are read in place: a copy would give the same bits.
        direct = whole is not None and whole.dtype == torch.float32 and whole.is_contiguous()
        k, pos = 0, 0  # current piece and the row within it
        for j, a in enumerate(range(0, n, step)):
            m = min(step, n - a)
            if direct:
                assert whole is not None
                block = whole[a:a + m]
            else:
                block = scratch[:m]
                if whole is not None:
                    block.copy_(whole[a:a + m])  # widening exactly
                else:
                    filled = 0
                    while filled < m:  # gather rows [a, a + m) from the pieces, widening exactly
                        take = min(m - filled, pieces[k].shape[0] - pos)
                        scratch[filled:filled + take].copy_(pieces[k][pos:pos + take])
                        filled, pos = filled + take, pos + take
                        if pos == pieces[k].shape[0]:
                            k, pos = k + 1, 0
            torch.sum(block, dim=0, out=block_sums[i, j])
            _row_squares(block.numpy(), sq[i, a:a + m])
    sums = block_sums[:, :n_blocks].to(torch.float64).sum(dim=1)
    for i in (int(j) for j in np.flatnonzero(~torch.isfinite(sums).all(dim=1).numpy())):
        # A column sum past float32's range (values above ~1e34, which bfloat16 can hold), or values that
        # are not finite: this layer's sums again in float64, where only non-finite values stay
        # non-finite (`combine` names them).
        rows = torch.cat([p.to(torch.float64) for p in layers[i]]) if n else torch.zeros((0, d), dtype=torch.float64)
        sums[i] = rows.sum(dim=0)
    return sums, torch.from_numpy(sq)


def _row_squares(x: np.ndarray, out: np.ndarray) -> None:
    """out [m] float64 = each row's sum of squares of x [m, d] float32.

    numpy's einsum makes one pass of fused multiply-adds per row in a fixed order, but one float32 sum
    over a whole row adds nearly in sequence: rows with a few massive entries (an LM's first token)
    came out 5e-6 off at d = 4096, the same error in every such row. Float32 sums of 128 columns
    added up in float64 stay within ~3e-7 at 1.0-1.2x the cost, where float64 throughout cost 4x
    (bench/RESULTS.md, "Cache writer"). Rows whose squares may have underflowed float32 (values
    below ~1e-19) or overflowed it (above ~1e19) are summed again in float64."""
    m, d = x.shape
    head = d - d % _SQUARES_CHUNK
    if head:
        part = x[:, :head].reshape(m, head // _SQUARES_CHUNK, _SQUARES_CHUNK)  # a view
        np.add.reduce(np.einsum("ijk,ijk->ij", part, part), axis=1, dtype=np.float64, out=out)
    else:
        out[:] = 0.0
    if head < d:
        tail = x[:, head:]
        out += np.einsum("ij,ij->i", tail, tail)
    redo = np.flatnonzero(~(out >= _TINY_SQUARES) | np.isinf(out))  # NaN too: float64 keeps only real ones
    if redo.size:
        rows = x[redo].astype(np.float64)
        out[redo] = np.einsum("ij,ij->i", rows, rows)


def device_row_sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [layers, n, d] stored values on a GPU. Returns there float64 column sums [layers, d] and
    per-row squared L2 norms [layers, n], queued on the current stream (no host synchronisation).
    All layers at once in a few large blocks; reductions of fixed shapes on one device are
    deterministic, which is what resume-exactness needs."""
    n_layers, n, d = x.shape
    step = _block_rows(n_layers * d, x.device)
    sums = torch.zeros((n_layers, d), dtype=torch.float64, device=x.device)
    sq = torch.empty((n_layers, n), dtype=torch.float64, device=x.device)
    for a in range(0, n, step):
        block = x[:, a:a + step].to(torch.float64)
        sums += block.sum(dim=1)
        sq[:, a:a + block.shape[1]] = torch.linalg.vecdot(block, block)
    return sums, sq


def combine(sums: np.ndarray, sq: np.ndarray, layers: list[list[torch.Tensor]]) -> list[ShardSums]:
    """ShardSums per layer from the row sums (host numpy: [layers, d], [layers, n]).

    layers: the same rows on the host (pieces per layer), read only to count bad values for the error.
    Raises ValueError on NaN or inf."""
    out = []
    for i in range(sums.shape[0]):
        total, sumsq = sums[i], float(np.add.reduce(sq[i]))
        if not (np.isfinite(total).all() and np.isfinite(sumsq)):
            bad = sum(int((~torch.isfinite(p)).sum()) for p in layers[i])
            raise ValueError(
                f"{bad} non-finite values (NaN/inf) in the rows to store; the model produced them or they "
                "overflow the stored dtype (float16 max 65504): use dtype bfloat16 or float32"
            )
        out.append(ShardSums(total.copy(), sumsq, float(np.add.reduce(np.sqrt(sq[i])))))
    return out


class SplitStats:
    """Running totals of one split for every layer; add shards in order."""

    def __init__(self, layers: list[int], d_model: int) -> None:
        self.count = 0
        self.sums = {L: ShardSums(np.zeros(d_model, dtype=np.float64), 0.0, 0.0) for L in layers}

    def copy(self) -> SplitStats:
        new = SplitStats([], 0)
        new.count = self.count
        new.sums = {L: ShardSums(s.sum.copy(), s.sumsq, s.sumnorm) for L, s in self.sums.items()}
        return new

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
