"""CPU kernels in plain C for the few steps torch's CPU operators do slowly, built on first use.

`row_topk` (`row_topk.c`: why it beats torch.topk) and `gather_dot`, the sparse decode's gradient to
its kept values (`sparse_decode.c`). The library is compiled by the host's
C compiler into a per-user cache the first time a process needs it (about a second) and loaded with
ctypes: no torch headers, no build step at install time. Where there is no compiler, or the build or
the load fails, or SAECACHE_NATIVE=0, every caller gets None and keeps its torch path: the kernels
change speed, never which values are kept (the selection is exact either way, tests/sae/test_native.py
checks it against torch.topk; among entries tied at the cut, the two paths may keep different ones).
"""

from __future__ import annotations

import ctypes
import math

import torch
from torch import Tensor
from torch.profiler import record_function

from sae.native.build import library

__all__ = ["block_width", "gather_dot", "library", "row_topk"]

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def block_width(m: int, k: int) -> int:
    """Columns per strided block for rows of m columns: about sqrt(m / k), which balances the search
    over the m / width block maxima against the scan of the k chosen blocks, and at least k blocks."""
    # capped at 16: wider blocks measured slower at 65,536 columns (bench/RESULTS.md "Top-k selection")
    width = min(16, 1 << max(0, round(math.log2(math.sqrt(max(m / k, 1.0))))))
    while width > 1 and m // width < k:
        width //= 2
    return width


def _threads(work: int) -> int:
    """torch's thread count for a call over `work` values, 1 below 2^18 of them: handing a small
    matrix to the other threads costs more than it saves."""
    return torch.get_num_threads() if work >= 1 << 18 else 1


def row_topk(z: Tensor, k: int, bias: Tensor | None = None, out: tuple[Tensor, Tensor] | None = None,
             ) -> tuple[Tensor, Tensor] | None:
    """(values [B, k] in z's dtype, column indices [B, k] int64) of a top-k of each row of z [B, M] on
    the CPU, in no order within a row; None where the kernel does not apply (not a float32 or bfloat16
    CPU matrix, no library, a NaN in z: torch.topk ranks NaN first, and the caller's torch path keeps
    that rule).

    bias [M] float32: the top-k of z + bias instead, each sum taken in float32 and the kept ones
    rounded to z's dtype (rounding keeps the order, so they are a top-k of the rounded sums too); the
    bias is added in the core's cache, not as a pass over z. out: contiguous [B, k] tensors of those
    dtypes to write into (a caller filling a larger result block by block)."""
    lib = library()
    if lib is None or z.device.type != "cpu" or z.dtype not in _DTYPES or z.dim() != 2:
        return None
    b, m = z.shape
    if not 0 < k <= m or m >= 2**31:
        return None
    if z.stride(1) != 1 or z.requires_grad:
        z = z.detach().contiguous()
    if bias is not None:
        if bias.shape != (m,) or bias.device.type != "cpu":
            raise ValueError(f"row_topk: bias must be a CPU vector of the {m} columns, got shape {tuple(bias.shape)}")
        bias = bias.detach().to(torch.float32).contiguous()
    if out is None:
        out = torch.empty((b, k), dtype=z.dtype), torch.empty((b, k), dtype=torch.int64)
    values, indices = out
    if (values.shape != (b, k) or indices.shape != (b, k) or values.dtype != z.dtype or indices.dtype != torch.int64
            or not values.is_contiguous() or not indices.is_contiguous()):
        raise ValueError(f"row_topk: out must be contiguous [{b}, {k}] tensors of {z.dtype} and int64")
    if b == 0:
        return values, indices
    with record_function("sae::row_topk"):  # a name for the profiler, which sees no aten op here
        status = lib.sae_row_topk(
            ctypes.c_void_p(z.data_ptr()), _DTYPES[z.dtype], b, m, z.stride(0), k, block_width(m, k),
            None if bias is None else ctypes.c_void_p(bias.data_ptr()),
            ctypes.c_void_p(values.data_ptr()), ctypes.c_void_p(indices.data_ptr()), _threads(b * m),
        )
    if status == -1:
        raise MemoryError("sae.native.row_topk: the kernel could not allocate its buffers")
    return (values, indices) if status == 0 else None


def gather_dot(grad: Tensor, w: Tensor, cols: Tensor, offsets: Tensor) -> Tensor | None:
    """[N] float32: grad[b] . w[cols[e]] for each entry e of row b, rows as a `Selection` lays them out
    (row b owns cols[offsets[b]:offsets[b + 1]], the last row to N). grad [B, d], w [M, d] float32 CPU;
    None where the kernel does not apply (another dtype or device, no library). Raises ValueError on
    offsets that do not start at 0 and rise within [0, N], columns outside [0, M) (the kernel checks
    them: it reads w through them) and cols that are not a 1-D integer tensor."""
    lib = library()
    if lib is None or grad.device.type != "cpu" or grad.dtype != torch.float32 or w.dtype != torch.float32:
        return None
    if grad.dim() != 2 or w.dim() != 2 or grad.shape[1] != w.shape[1] or w.device.type != "cpu":
        return None
    grad, w = grad.contiguous(), w.detach().contiguous()
    if cols.dim() != 1 or cols.dtype.is_floating_point or cols.dtype.is_complex or cols.dtype == torch.bool:
        raise ValueError(f"gather_dot: cols must be a 1-D integer tensor, got {cols.dtype} of shape "
                         f"{tuple(cols.shape)}")
    if offsets.shape != (grad.shape[0],):
        raise ValueError(f"gather_dot: offsets must have one entry per row of grad ({grad.shape[0]}), "
                         f"got shape {tuple(offsets.shape)}")
    cols, offsets = cols.to(torch.int64).contiguous(), offsets.to(torch.int64).contiguous()
    out = torch.empty(cols.shape[0], dtype=torch.float32)
    with record_function("sae::gather_dot"):
        status = lib.sae_gather_dot(
            ctypes.c_void_p(grad.data_ptr()), ctypes.c_void_p(w.data_ptr()), ctypes.c_void_p(cols.data_ptr()),
            ctypes.c_void_p(offsets.data_ptr()), grad.shape[0], cols.shape[0], w.shape[0], w.shape[1],
            ctypes.c_void_p(out.data_ptr()), _threads(cols.shape[0] * w.shape[1]),
        )
    if status == -3:
        raise ValueError("gather_dot: offsets must start at 0 and be non-decreasing within [0, N]")
    if status == -4:
        raise ValueError(f"gather_dot: a column index is outside [0, {w.shape[0]})")
    return out
