"""Per-layer float64 statistics of the stored values, within FORMAT.md 2's precision contract, and
bit-identical across resumes.

Each shard stores its own sums (sum of rows, sum of squared norms, sum of norms). Split totals are
always the sum of those per-shard sums taken in shard order, so a resumed write, which re-reads the
sums of the shards already on disk, reaches the same bits as an uninterrupted one.

A shard's sums are computed where its rows are: on the GPU (before the device-to-host copy) when the
producer hands the writer CUDA tensors, on the CPU otherwise. Either way the values are widened
exactly (to float32 within a block of rows on the CPU, to float64 on a GPU), and every sum depends
only on the shard's rows and the kind of device, never on the number of threads, the CPU, the
availability of a C compiler (cache/stats.c and its numpy twin agree bit for bit) or on how the
producer split its appends, so a shard rewritten after a crash on the same kind of device gets the
same bits. The sums of squared norms and of norms are added up from the per-row values by numpy,
whose order of addition is fixed.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import native

# Values per block of rows on a GPU: a handful of kernel launches.
_DEVICE_BLOCK_ELEMENTS = 1 << 24
# The CPU algorithm (`host_row_sums`), shared by cache/stats.c and its numpy twin `_twin_row_sums`:
# columns per float32 partial of a row's squares, accumulators per chunk, rows per float32 pairwise sum.
_CHUNK, _LANES, _BLOCK_ROWS = 128, 16, 256
# Rows whose float32 sum of squares is below _TINY_SQUARES (products may have underflowed), or inf, are
# summed again in float64.
_TINY_SQUARES = 1e-30
# Values per numpy call of the twin: each numpy call gives up the interpreter lock and must take it back,
# and beside a thread that runs Python every retake can wait for the interpreter's switch interval
# (bench/RESULTS.md "Cache writer", run 6), so its blocks are large.
_TWIN_ELEMENTS = 1 << 21
_KERNEL_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


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


def _bind(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.cache_row_sums.argtypes = [ptr, ptr, ctypes.c_int, ctypes.c_int, i64, ptr, ptr]
    lib.cache_row_sums.restype = ctypes.c_int
    return lib


def _build(force: bool = False) -> Path:
    # -ffp-contract=off: no fused multiply-adds, so that every CPU gets the numpy twin's bits
    flags = ("-O3", "-march=native", "-ffp-contract=off")
    return native.build("cache_stats", [Path(__file__).with_name("stats.c")], [], [flags], force=force)


@functools.cache
def _library() -> ctypes.CDLL | None:
    return native.load("cache.stats", _build, _bind)


def host_row_sums(layers: list[list[torch.Tensor]], n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 column sums [len(layers), d] and per-row squared L2 norms [len(layers), n] of CPU rows.

    layers[i]: the pieces of layer i, row blocks [m_k, d] in order (sum m_k = n), in the stored dtype.
    Every value is widened exactly to float32, and the sums follow one fixed order that depends on the
    rows alone (not on the pieces, the threads or the CPU):
    - column sums: within each block of 256 rows counted from the first row, the pairwise float32 sum
      (rows 0+1, 2+3, ..., then those pairs; a partial block as if padded with -0.0); the blocks' sums
      added in float64, in order. Float64 throughout took 1.2-2.4x as long, the writer's largest CPU cost
      beside the disk, for precision no reader needs (FORMAT.md 2 states the bound).
    - each row's squared norm: per chunk of 128 columns a float32 sum (16 accumulators, each adding its
      columns' squares in order, then added pairwise), the chunks added in float64 in order. One float32
      sum over a whole row came out 5e-6 off for rows with a few massive entries at d = 4096 (an LM's
      first token, the same error in every such row); chunks keep it within ~3e-7. Rows whose float32 sum
      of squares is below 1e-30 (values below ~1e-19 may have underflowed) or infinite (values above
      ~1e19) are summed again in float64.
    cache/stats.c computes this in one pass (float32 and bfloat16 rows); `_twin_row_sums` is the same
    algorithm in numpy, used for float16 rows and where the C library does not build, with the same
    bits (tests/cache/test_stats.py checks it), so a harvest resumed on a machine without a compiler
    still gets the statistics of an uninterrupted one."""
    for i, pieces in enumerate(layers):  # the C kernel reads through raw pointers: check what it assumes
        if sum(p.shape[0] for p in pieces) != n or any(p.dim() != 2 or p.shape[1] != d for p in pieces) \
                or len({p.dtype for p in pieces}) > 1 or any(p.device.type != "cpu" for p in pieces):
            raise ValueError(f"host_row_sums: layer {i}'s pieces must be CPU [m, {d}] blocks of one dtype "
                             f"whose rows add up to {n}, got {[(tuple(p.shape), p.dtype) for p in pieces]}")
    sums = np.zeros((len(layers), d), dtype=np.float64)
    sq = np.zeros((len(layers), n), dtype=np.float64)
    lib = _library()
    for i, pieces in enumerate(layers):
        if n == 0:
            continue
        if lib is not None and pieces[0].dtype in _KERNEL_DTYPES:
            parts = [p if p.is_contiguous() else p.contiguous() for p in pieces if p.shape[0]]
            ptrs = (ctypes.c_void_p * len(parts))(*[p.data_ptr() for p in parts])
            counts = (ctypes.c_int64 * len(parts))(*[p.shape[0] for p in parts])
            status = lib.cache_row_sums(ptrs, counts, len(parts), _KERNEL_DTYPES[pieces[0].dtype], d,
                                        sums[i].ctypes.data, sq[i].ctypes.data)
            if status != 0:
                raise MemoryError("cache.stats: the statistics kernel could not allocate its buffers")
        else:
            _twin_row_sums(pieces, n, d, sums[i], sq[i])
        redo = np.flatnonzero(~(sq[i] >= _TINY_SQUARES) | np.isinf(sq[i]))  # NaN too: float64 keeps only real ones
        if redo.size:
            rows = torch.cat(pieces)[torch.from_numpy(redo)].to(torch.float64).numpy()
            sq[i, redo] = _chunk_squares(_pad_columns(rows))
        if not np.isfinite(sums[i]).all():
            # A column sum past float32's range (values above ~1e34, which bfloat16 can hold), or values that
            # are not finite: this layer's sums again in float64, where only non-finite values stay
            # non-finite (`combine` names them).
            sums[i] = torch.cat([p.to(torch.float64) for p in pieces]).sum(dim=0).numpy()
    return torch.from_numpy(sums), torch.from_numpy(sq)


def _pad_columns(x: np.ndarray) -> np.ndarray:
    width = -(-x.shape[1] // _CHUNK) * _CHUNK
    if width == x.shape[1]:
        return x
    out = np.zeros((x.shape[0], width), dtype=x.dtype)
    out[:, :x.shape[1]] = x
    return out


def _chunk_squares(x: np.ndarray) -> np.ndarray:
    """[m] float64: each row's sum of squares of x [m, width] (width a multiple of 128, zero past the
    row's end) by host_row_sums' rule, in x's dtype within a chunk."""
    m, width = x.shape
    with np.errstate(over="ignore", invalid="ignore"):  # float32 overflow: host_row_sums redoes those rows
        return _chunk_squares_quiet(x, m, width)


def _chunk_squares_quiet(x: np.ndarray, m: int, width: int) -> np.ndarray:
    v = (x * x).reshape(m, width // _CHUNK, _CHUNK // _LANES, _LANES)
    lanes = v[:, :, 0].copy()
    for g in range(1, _CHUNK // _LANES):
        lanes += v[:, :, g]
    while lanes.shape[-1] > 1:
        lanes = lanes[..., 0::2] + lanes[..., 1::2]
    total = np.zeros(m, dtype=np.float64)
    for c in range(width // _CHUNK):
        total += lanes[:, c, 0]
    return total


def _twin_row_sums(pieces: list[torch.Tensor], n: int, d: int, sums: np.ndarray, sq: np.ndarray) -> None:
    """cache/stats.c's `cache_row_sums` in numpy (see host_row_sums): sums [d] and sq [n] filled."""
    width = -(-d // _CHUNK) * _CHUNK
    step = max(1, _TWIN_ELEMENTS // (width * _BLOCK_ROWS)) * _BLOCK_ROWS  # whole blocks per call
    scratch = torch.zeros((min(step, -(-n // _BLOCK_ROWS) * _BLOCK_ROWS), width), dtype=torch.float32)
    x = scratch.numpy()  # zero past column d, for the squares
    k, pos = 0, 0  # current piece and the row within it
    for a in range(0, n, step):
        m = min(step, n - a)
        filled = 0
        while filled < m:  # rows [a, a + m) from the pieces, widened exactly
            take = min(m - filled, pieces[k].shape[0] - pos)
            scratch[filled:filled + take, :d].copy_(pieces[k][pos:pos + take])
            filled, pos = filled + take, pos + take
            if pos == pieces[k].shape[0]:
                k, pos = k + 1, 0
        sq[a:a + m] = _chunk_squares(x[:m])
        whole = -(-m // _BLOCK_ROWS) * _BLOCK_ROWS
        x[m:whole, :d] = -0.0  # a partial block: -0.0 adds nothing, to any value
        tree = x[:whole].reshape(whole // _BLOCK_ROWS, _BLOCK_ROWS, width)
        with np.errstate(over="ignore", invalid="ignore"):  # float32 overflow: host_row_sums redoes the layer
            while tree.shape[1] > 1:
                tree = tree[:, 0::2] + tree[:, 1::2]
            for block in tree[:, 0, :d]:
                sums += block


def device_row_sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [layers, n, d] stored values on a GPU. Returns there float64 column sums [layers, d] and
    per-row squared L2 norms [layers, n], queued on the current stream (no host synchronisation).
    All layers at once in a few large blocks; reductions of fixed shapes on one device are
    deterministic, which is what resume-exactness needs."""
    n_layers, n, d = x.shape
    step = max(1, _DEVICE_BLOCK_ELEMENTS // max(n_layers * d, 1))
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
