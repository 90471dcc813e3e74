"""The 8-bit store dtype `int8`: signed 8-bit codes with a float32 scale per row and one per column.

Residual streams of causal LMs have a few dimensions whose values are tens of times larger than the
rest (SmolLM2-135M: the largest column RMS is 30-65 times the median). One absmax scale per row then
spends most of the 8 bits on those dimensions and leaves the others a few levels: 3.0-3.8% relative
error per layer there, and fp8 e4m3 with a row scale 1.8-2.2%. Dividing each column by its RMS over
the shard first evens them out, so the row's absmax scale fits the bulk: 0.8% on every layer of both
models measured (bench/RESULTS.md, "8-bit cache"). The column scales cost 4 * d_model bytes per
shard and layer, nothing per row.

The format (FORMAT.md section 2.1), for one layer of one shard with rows x [n, d] in float32:

    c[j] = sqrt(sum_i x[i, j]^2 / n)              in float32; a column of zeros gets 1
    y    = x / c                                   float32 division, per element
    s[i] = float32(max_j |y[i, j]|) / 127          float32 division; 0 for a row of zeros
    q    = clamp(round_half_even(y / s), -127, 127) as int8 (0 where s == 0)

and the decoded value, the one every reader and the statistics use, is

    x'[i, j] = (float32(q[i, j]) * s[i]) * c[j]    two float32 products, in this order

IEEE float32 products and quotients are correctly rounded on every CPU and GPU, so decoding gives
the same bits everywhere. Only the decoding rule is normative: a writer may choose c and s otherwise.
"""

from __future__ import annotations

import numpy as np
import torch

INT8 = "int8"
ENCODED_DTYPES: tuple[str, ...] = (INT8,)
QMAX = 127
CODE_DTYPE = torch.int8
SCALE_DTYPE = torch.float32
DECODED_DTYPE = torch.float32  # what decoding gives; the loader casts it to the training dtype


def is_encoded(dtype_name: str) -> bool:
    """Whether a manifest `dtype` is one of the 8-bit encodings (codes plus scales)."""
    return dtype_name in ENCODED_DTYPES


def row_scale_key(layer: int) -> str:
    return f"scale.{layer}.row"


def col_scale_key(layer: int) -> str:
    return f"scale.{layer}.col"


def column_scale(x: torch.Tensor) -> torch.Tensor:
    """c [d] float32: each column's root mean square over the rows of x [n, d] float32 (1 for a zero column).

    Summed in float32: c is stored, so its precision only has to be good enough to even the columns out,
    and a float64 copy of the shard would cost the writer more than the rest of the encoding."""
    c = torch.sqrt(x.square().sum(dim=0) / max(x.shape[0], 1))
    return torch.where(c > 0, c, torch.ones_like(c))


def check_scales(s: torch.Tensor, c: torch.Tensor) -> None:
    """Raise ValueError unless the scales of an encoding are finite. A NaN or an infinity in the rows
    reaches its row's absmax (amax propagates NaN) or its column's scale, so these two small vectors
    vouch for every value."""
    if not (bool(torch.isfinite(s).all()) and bool(torch.isfinite(c).all())):
        raise ValueError("non-finite values (NaN/inf) in the rows to store, or values too large for the int8 "
                         "store dtype (a column's sum of squares overflows float32): the model produced them; "
                         "store float32 to keep them")


def encode(x: torch.Tensor, check: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [n, d] (any float dtype, any device) -> (q int8 [n, d], s float32 [n], c float32 [d]).

    Works on the device of x, in a few passes over it. check=True: raises ValueError on non-finite values
    (they have no code) and on values whose squares overflow float32 (|x| > 1e19); that reads two scalars
    back from the device, so a GPU caller that must not wait passes False and calls check_scales later."""
    x = x.to(torch.float32)
    c = column_scale(x)
    y = x / c
    s = y.abs().amax(dim=1) / QMAX if y.shape[1] else torch.zeros(y.shape[0], dtype=torch.float32, device=y.device)
    if check:
        check_scales(s, c)
    # A row of zeros has s = 0 and y = 0: dividing by 1 instead gives its codes, 0.
    y.div_(torch.where(s > 0, s, torch.ones_like(s))[:, None]).round_().clamp_(-QMAX, QMAX)
    return y.to(CODE_DTYPE), s, c


def decode(q: torch.Tensor, s: torch.Tensor, c: torch.Tensor, dtype: torch.dtype = DECODED_DTYPE) -> torch.Tensor:
    """(q [..., d] int8, s [...] float32, c [d] float32) -> x' [..., d] in `dtype`, on q's device.

    The decoded float32 values (module docstring), then cast to `dtype`: the same bits on a CPU and a GPU."""
    x = (q.to(torch.float32) * s.unsqueeze(-1)) * c
    return x if dtype == torch.float32 else x.to(dtype)


def decode_numpy(q: np.ndarray, s: np.ndarray, c: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The same decoding in numpy, for threads that must not start torch's thread pool (the loader):
    q [n, d] int8, s [n] float32, c [d] float32 -> float32 [n, d], written into `out` when given."""
    out = np.empty(q.shape, dtype=np.float32) if out is None else out
    np.copyto(out, q)  # exact: every int8 is a float32 (a separate cast is faster than a mixed-type multiply)
    np.multiply(out, s[:, None], out=out)
    np.multiply(out, c[None, :], out=out)
    return out


# ---- packed rows: codes, row scale and shard index in one byte row, decoded on the training device ----------
# A training on a GPU moves int8 rows to the device and decodes them there (a quarter of float32's bytes
# through the host-to-device copy). Each row of each layer travels as PACKED_EXTRA more bytes than its codes:
# [d codes | row scale, float32 | shard index, int32] (little-endian, as the host and the GPU are), and the
# column scales of every shard travel once, as a table [shards, (layers,) d] that the shard index selects from.
PACKED_EXTRA = 8


def pack_into(dest: np.ndarray, q: np.ndarray, s: np.ndarray, shard: int) -> None:
    """dest [n, d + PACKED_EXTRA] uint8 <- codes q [n, d] int8, row scales s [n] float32, the shard index."""
    d = q.shape[1]
    dest[:, :d] = q.view(np.uint8)
    dest[:, d:d + 4] = np.ascontiguousarray(s, dtype=np.float32).view(np.uint8).reshape(-1, 4)
    dest[:, d + 4:d + 8] = np.array([shard], dtype="<i4").view(np.uint8)


def decode_packed(x: torch.Tensor, columns: torch.Tensor, dtype: torch.dtype = DECODED_DTYPE) -> torch.Tensor:
    """Packed rows x [B, d + 8] or [B, L, d + 8] uint8 and the column-scale table [shards, d] or
    [shards, L, d] float32, on one device (any) -> the decoded rows [B, (L,) d] in `dtype`, on that device:
    the same bits as `decode` of the same codes and scales (the same two float32 products, in order)."""
    d = x.shape[-1] - PACKED_EXTRA
    q = x[..., :d].view(CODE_DTYPE)
    s = x[..., d:d + 4].contiguous().view(torch.float32)[..., 0]
    shard = x[..., d + 4:d + 8].contiguous().view(torch.int32)[..., 0].long()
    if x.dim() == 2:
        c = columns[shard]  # [B, d]
    else:
        c = columns[shard, torch.arange(x.shape[1], device=x.device)]  # [B, L, d]
    out = (q.to(torch.float32) * s.unsqueeze(-1)) * c
    return out if dtype == torch.float32 else out.to(dtype)
