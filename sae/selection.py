"""Which latents are active: the (row, latent) pairs a TopK-family SAE keeps.

A `Selection` is a flat, row-major list of N kept entries for a batch of B tokens, the layout
`torch.nn.functional.embedding_bag` takes (`cols` as input, `offsets` as bag starts). TopK keeps
exactly k per row; BatchTopK and threshold inference keep a variable number per row, which is why
the layout is flat with offsets rather than [B, k].

Selections are computed without gradient; the values that carry gradient come from
`sae.sparse_decode.gather_preacts`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sae import native

if TYPE_CHECKING:
    from sae.collective import Collective


@dataclass(frozen=True)
class Selection:
    """N kept entries of a [B, M] pre-activation matrix, grouped by row.

    rows [N] long: token row of each entry (non-decreasing).
    cols [N] long: latent index of each entry.
    offsets [B] long: start of row b's entries in `cols` (row b owns offsets[b]:offsets[b+1]).
    n_latents: M.
    values [N] or None: the kept pre-activations, where the selection computed them anyway (a top-k
    returns them), so that `gather_preacts` need not index the [B, M] matrix again;
    values_from, values_version: the matrix they were read from and its version counter then
    (`gather_preacts` uses them only for that matrix, unmodified).
    """

    rows: Tensor
    cols: Tensor
    offsets: Tensor
    n_latents: int
    values: Tensor | None = None
    values_from: Tensor | None = None
    values_version: int = 0

    @property
    def n_rows(self) -> int:
        return self.offsets.shape[0]

    def values_for(self, z: Tensor) -> Tensor | None:
        """`values` if they were read from z as it is now (z or a detached alias of it, not modified in
        place since: same memory, layout and version), else None."""
        src = self.values_from
        if self.values is None or src is None:
            return None
        same = (src.data_ptr() == z.data_ptr() and src.shape == z.shape and src.stride() == z.stride()
                and src.dtype == z.dtype and src.device == z.device and _version(z) == self.values_version)
        return self.values if same else None

    @functools.cached_property
    def by_latent(self) -> tuple[Tensor, Tensor]:
        """(order [N], starts [M]): the entries sorted by latent, and each latent's first position in that
        order. Computed once per selection: the encoder's and the decoder's weight gradients both
        group the entries by latent (`sae.sparse_decode.scatter_rows`)."""
        # int32 keys sort in about half the time of int64 ones on the CPU (bench/RESULTS.md, "The TopK step").
        keys = self.cols.to(torch.int32) if self.n_latents < 2**31 else self.cols
        sorted_cols, order = keys.sort()
        return order, _offsets_from_rows(sorted_cols, self.n_latents)

    def counts(self) -> Tensor:
        """[B] entries kept per row."""
        return torch.bincount(self.rows, minlength=self.n_rows)


def _version(t: Tensor) -> int:
    """t's in-place modification counter; -1 for an inference-mode tensor, which keeps none."""
    return -1 if t.is_inference() else t._version


def _offsets_from_rows(rows: Tensor, n_rows: int) -> Tensor:
    """Start of each row's entries in the non-decreasing `rows` (searchsorted rather than bincount +
    cumsum, whose CUDA kernel reads the largest index back to the host: a sync per step)."""
    return torch.searchsorted(rows, torch.arange(n_rows, device=rows.device, dtype=rows.dtype))


# Per-row top-k on the CPU through strided blocks (`strided_block_topk`) from this many columns up, at
# the width `strided_width` picks (the best one measured by bench/bench_topk_select.py, bench/RESULTS.md
# "Top-k selection"); torch.topk below it, on CUDA (not measured there yet) and where M does not split
# into such blocks.
STRIDED_MIN_COLUMNS = 1024


def strided_width(m: int, k: int) -> int | None:
    """The block width `row_topk` uses for rows of m columns and a top-k on the CPU, or None (torch.topk).
    About sqrt(m / k), which balances the two top-k's the blocked selection runs (over m / width block
    maxima and over k * width candidates), rounded to a power of two that divides m."""
    if m < STRIDED_MIN_COLUMNS or k < 1:
        return None
    width = 1 << max(1, round(math.log2(math.sqrt(m / k))))
    while width > 1 and (m % width or m // width < 2 * k):
        width //= 2
    return width if width > 1 else None


@torch.no_grad()
def row_topk(z: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, column indices), each [B, k], of a top-k of each row of z [B, M] (in no order), in z's
    dtype. On the CPU, the C kernel of `sae.native` (the strided block search row by row in the core's
    cache: 4-6x faster than the torch path at 3072 columns, bench/RESULTS.md "Top-k selection"); where
    it does not apply (no compiler, float16 or float64, NaN in z), `strided_block_topk` where the row is
    wide enough; elsewhere, and on CUDA, torch.topk over the whole row."""
    picked = native.row_topk(z, k)  # None off the CPU and wherever the kernel does not apply
    if picked is not None:
        return picked
    width = strided_width(z.shape[1], k) if z.device.type == "cpu" else None
    if width is None:
        return z.topk(k, dim=1, sorted=False)
    return strided_block_topk(z, k, width)


@torch.no_grad()
def row_topk_indices(z: Tensor, k: int) -> Tensor:
    """[B, k] column indices of a top-k of each row of z [B, M] (in no order): `row_topk`'s."""
    return row_topk(z, k)[1]


@torch.no_grad()
def strided_block_topk(z: Tensor, k: int, width: int) -> tuple[Tensor, Tensor]:
    """The exact per-row top-k of z [B, M] (values, indices [B, k]) through blocks of `width` columns.

    Block c holds the columns c, c + M/width, c + 2M/width, ... (strided, so that the block maxima are
    one elementwise-max pass over `width` contiguous [B, M/width] slices, which vectorises in bf16 too).
    Only the k blocks with the largest maxima can hold a top-k entry: if an entry e of another block
    were among the k largest, those k blocks' maxima, each >= that block's maximum >= e, would be k
    further entries >= e (ties at the cut: the k blocks hold at least k entries >= the k-th largest
    maximum, so a top-k can be completed inside them). So a top-k over the M / width maxima, then
    over the k * width entries of the chosen blocks, costs two small top-k's instead of one over M,
    whose CPU kernel costs ~7 ns an entry whatever k is. Needs M divisible by width, M / width >= k."""
    b, m = z.shape
    n_blocks = m // width
    if n_blocks * width != m or n_blocks < k:
        raise ValueError(f"strided top-k needs M={m} to split into blocks of {width} columns, at least k={k} of them")
    z3 = z.reshape(b, width, n_blocks)  # z3[:, j, c] = z[:, j * n_blocks + c]; a view when z is contiguous
    blocks = z3.amax(dim=1).topk(k, dim=1, sorted=False).indices  # [B, k]: the blocks with the largest maxima
    # The chosen blocks' entries, [B, width, k], read through an expanded index (no [B, k * width]
    # column index is built: that and a gather through it cost 3x as much).
    cand = z3.gather(2, blocks[:, None, :].expand(b, width, k))
    values, pick = cand.view(b, width * k).topk(k, dim=1, sorted=False)
    return values, (pick // k) * n_blocks + blocks.gather(1, pick % k)


@torch.no_grad()
def blocked_topk_indices(z: Tensor, k: int, blocks: int) -> Tensor:
    """The same selection in two stages: a top-k in each of `blocks` equal column blocks, then a top-k
    among those blocks * k candidates. Exact (every row's top-k lies among its blocks' top-k's); measured
    as an alternative, see `row_topk`. M must be a multiple of `blocks` with M / blocks >= k."""
    b, m = z.shape
    width = m // blocks
    if width * blocks != m or width < k:
        raise ValueError(f"blocked top-k needs M={m} to split into {blocks} blocks of at least k={k} columns")
    vals, idx = z.view(b, blocks, width).topk(k, dim=2, sorted=False)
    idx = idx + torch.arange(0, m, width, device=z.device)[None, :, None]
    pick = vals.reshape(b, -1).topk(k, dim=1, sorted=False).indices
    return idx.reshape(b, -1).gather(1, pick)


@torch.no_grad()
def select_topk(z: Tensor, k: int) -> Selection:
    """Per-row TopK of z [B, M]: exactly k entries per row (in no order within a row), with their values."""
    b, m = z.shape
    values, cols = row_topk(z, k)
    rows = torch.arange(b, device=z.device).repeat_interleave(k)
    offsets = torch.arange(0, b * k, k, device=z.device)
    return Selection(rows, cols.reshape(-1), offsets, m, values.reshape(-1), z, _version(z))


# `encode_topk`'s blocks of rows in bf16: a block's pre-activations (rows x M values) about this many
# bytes, so that the top-k reads them from the cache the GEMM just wrote them to (the L3 here), and at
# least this many rows, below which the GEMMs lose their efficiency. float32 takes the batch in one
# block: its GEMM is compute-bound, re-packs the weight at every call, and in blocks it lost 3-20%
# (bench/RESULTS.md "The encoder GEMM and the top-k in blocks of rows").
ENCODE_BLOCK_BYTES = 6 << 20
ENCODE_MIN_BLOCK_ROWS = 256


def encode_block_rows(m: int, dtype: torch.dtype, rows: int) -> int:
    """Rows per block of `encode_topk` for a batch of `rows` rows and M = m latents computed in dtype."""
    if dtype != torch.bfloat16:
        return max(1, rows)
    return max(1, min(rows, max(ENCODE_MIN_BLOCK_ROWS, ENCODE_BLOCK_BYTES // max(1, m * 2))))


def cpu_matmul_dtype(t: Tensor) -> torch.dtype:
    """The dtype a CPU matmul of t runs in: CPU autocast's where it is on and casts t (every floating
    dtype but float64), else t's own."""
    if torch.is_autocast_enabled("cpu") and t.is_floating_point() and t.dtype != torch.float64:
        return torch.get_autocast_dtype("cpu")
    return t.dtype


@torch.no_grad()
def encode_topk(x_c: Tensor, w_enc: Tensor, b_enc: Tensor, k: int) -> Selection:
    """Per-row TopK of z = x_c @ w_enc.T + b_enc (x_c [B, d], w_enc [M, d], b_enc [M]) without the [B, M]
    matrix z: the GEMM runs over blocks of rows, and each block's top-k (with b_enc added on the way,
    `sae.native.row_topk`) reads it while it is still in the cache. On the CPU, a TopK step's GEMM then
    stops writing and reading back B x M values: 1.21x at 12,288 latents in bf16 (bench/RESULTS.md). The
    matmul runs in `cpu_matmul_dtype(x_c)`, as F.linear would; the kept values are in that dtype, z + b_enc
    rounded to it, and form the Selection's `values` (for `gather_preacts` with z=None). Exact: the kept
    entries are a top-k of each row of that z (ties at the cut aside)."""
    b, _ = x_c.shape
    m = w_enc.shape[0]
    dtype = cpu_matmul_dtype(x_c)
    if x_c.device.type != "cpu":
        raise ValueError(f"encode_topk runs on the CPU (got {x_c.device}); elsewhere compute z and `select_topk`")
    with torch.autocast("cpu", enabled=False):
        x = x_c.detach().to(dtype)
        w_t = w_enc.detach().to(dtype).t()
        bias = b_enc.detach().to(torch.float32)
        values = torch.empty((b, k), dtype=dtype)
        cols = torch.empty((b, k), dtype=torch.int64)
        rows_per_block = encode_block_rows(m, dtype, b)
        block = torch.empty((rows_per_block, m), dtype=dtype)  # reused: a fresh one a block would fault in pages
        for r0 in range(0, b, rows_per_block):
            r1 = min(b, r0 + rows_per_block)
            z = torch.mm(x[r0:r1], w_t, out=block[: r1 - r0])
            if native.row_topk(z, k, bias, out=(values[r0:r1], cols[r0:r1])) is None:
                z += bias  # the torch path: no kernel here, or a NaN in z (torch.topk's rule for it applies)
                values[r0:r1], cols[r0:r1] = row_topk(z, k)
    rows = torch.arange(b).repeat_interleave(k)
    return Selection(rows, cols.reshape(-1), torch.arange(0, b * k, k), m, values.reshape(-1))


def _encoded_rows(x: Tensor, w_enc: Tensor, b_enc: Tensor, dtype: torch.dtype) -> Tensor:
    """z for the rows x [S, d] as `encode_topk` defines it: the product in dtype, b_enc added in float32,
    the sum rounded to dtype."""
    with torch.autocast("cpu", enabled=False):
        z = torch.mm(x.detach().to(dtype), w_enc.detach().to(dtype).t())
        return (z.float() + b_enc.detach().float()).to(dtype)


@torch.no_grad()
def encode_batch_topk(x_c: Tensor, w_enc: Tensor, b_enc: Tensor, k: int) -> Selection | None:
    """BatchTopK's selection (the k*B largest entries of z = x_c @ w_enc.T + b_enc over the whole batch,
    `select_batch_topk`) without the [B, M] matrix z: each row's top 2k candidates come from `encode_topk`,
    and the rows whose every candidate beats the cut (they may hold more winners) are computed whole, as
    `batch_topk_flat` adds them from a kept z. Values as `encode_topk` defines them, in its dtype, up to
    the GEMM's rounding: a saturated row's come from a GEMM over those rows only, which a float32 kernel
    may round differently in the last bit. None where the candidates would be the whole matrix (2k >= M):
    the caller keeps z then."""
    b, m = x_c.shape[0], w_enc.shape[0]
    n, c = k * b, 2 * k
    if c >= m or n >= b * c:
        return None
    cand = encode_topk(x_c, w_enc, b_enc, c)
    assert cand.values is not None  # encode_topk always keeps them
    cand_val, cand_col = cand.values.view(b, c), cand.cols.view(b, c)
    cut, pos = cand_val.reshape(-1).topk(n, sorted=False)
    saturated = cand_val.min(dim=1).values > cut.min()
    if bool(saturated.any()):  # the CPU only: a host read costs nothing here
        sat = saturated.nonzero().squeeze(1)
        z_sat = _encoded_rows(x_c[sat], w_enc, b_enc, cand_val.dtype)
        # Fewer than B/2 rows saturate (each holds 2k of the k*B winners, and the cut is not one of its),
        # so some rows keep their candidates. The pool: their candidates, then the saturated rows' whole z;
        # a pick's row and column are worked out from its position (no [S, M] index arrays).
        keep = (~saturated).nonzero().squeeze(1)
        first = keep.numel() * c
        values, pos = torch.cat([cand_val[keep].reshape(-1), z_sat.reshape(-1)]).topk(n, sorted=False)
        in_cand = pos < first
        p_cand, p_sat = pos.clamp_max(first - 1), (pos - first).clamp_min(0)
        rows = torch.where(in_cand, keep[p_cand // c], sat[p_sat // m])
        cols = torch.where(in_cand, cand_col[keep].reshape(-1)[p_cand], p_sat % m)
    else:
        rows, cols, values = pos // c, cand_col.reshape(-1)[pos], cand_val.reshape(-1)[pos]
    order = (rows * m + cols).argsort()  # row-major, as a Selection lays its entries out
    rows, cols, values = rows[order], cols[order], values[order]
    return Selection(rows, cols, _offsets_from_rows(rows, b), m, values)


@torch.no_grad()
def select_flat(flat: Tensor, shape: tuple[int, int]) -> Selection:
    """From flat indices into a [B, M] matrix (any order) -> row-major Selection."""
    b, m = shape
    flat = flat.sort().values
    rows, cols = flat // m, flat % m
    return Selection(rows, cols, _offsets_from_rows(rows, b), m)


@torch.no_grad()
def batch_topk_flat(a: Tensor, n: int, candidates_per_row: int) -> Tensor:
    """Flat indices of the n largest entries of a [B, M] (in no order); exact.

    A full top-n over B*M values is slow on CPU, so first keep each row's top `candidates_per_row`
    and take the top n among those. That is exact unless a row has all its candidates above the
    resulting cut-off (it might hold more winners): such rows are added whole and the top n is taken
    again. The cut-off can only rise in that second pass, so one refinement suffices."""
    b, m = a.shape
    c = min(candidates_per_row, m)
    if c >= m or n >= b * c:
        return a.reshape(-1).topk(n, sorted=False).indices
    cand_val, cand_col = row_topk(a, c)
    row_base = torch.arange(b, device=a.device)[:, None] * m
    cand_flat = (cand_col + row_base).reshape(-1)
    cut, pos = cand_val.reshape(-1).topk(n, sorted=False)
    saturated = cand_val.min(dim=1).values > cut.min()
    if not bool(saturated.any()):
        return cand_flat[pos]
    keep = ~saturated
    pool_val = torch.cat([cand_val[keep].reshape(-1), a[saturated].reshape(-1)])
    full_rows = (torch.arange(m, device=a.device) + row_base[saturated]).reshape(-1)
    pool_flat = torch.cat([(cand_col[keep] + row_base[keep]).reshape(-1), full_rows])
    return pool_flat[pool_val.topk(n, sorted=False).indices]


@torch.no_grad()
def select_batch_topk(a: Tensor, k: int) -> Selection:
    """BatchTopK: the k*B largest entries of a [B, M] over the whole batch; per-row counts vary."""
    b, _ = a.shape
    return select_flat(batch_topk_flat(a, k * b, candidates_per_row=2 * k), (b, a.shape[1]))


@torch.no_grad()
def select_global_batch_topk(z: Tensor, k: int, c: Collective) -> Selection:
    """BatchTopK over a data-parallel global batch: the entries of this rank's z [b, M] among the
    top k*B of all ranks' rows (B the global row count). Each rank proposes its own top k*B (the
    global top k*B holds at most that many of its entries), the candidate values are gathered, and
    the k*B-th largest is the cut-off; equal to the 1-process selection, ties at the cut-off aside."""
    b, m = z.shape
    n_global = k * int(c.all_sum(torch.tensor([b], device=z.device)).item())
    n_cand = min(n_global, b * m)
    flat = batch_topk_flat(z, n_cand, candidates_per_row=2 * k)
    vals = z.reshape(-1)[flat]
    padded = torch.full((n_global,), float("-inf"), dtype=z.dtype, device=z.device)
    padded[:n_cand] = vals
    cut = torch.cat(c.all_gather(padded)).topk(n_global, sorted=False).values.min()
    return select_flat(flat[vals >= cut], (b, m))


@torch.no_grad()
def select_threshold(a: Tensor, theta: float) -> Selection:
    """Inference for batch-level SAEs: entries of a [B, M] strictly above theta."""
    rows, cols = (a > theta).nonzero(as_tuple=True)  # row-major already
    return Selection(rows, cols, _offsets_from_rows(rows, a.shape[0]), a.shape[1])


@torch.no_grad()
def select_dead_topk(z: Tensor, dead_mask: Tensor, k_aux: int) -> Selection:
    """AuxK: per-row top k_aux of z [B, M] among latents where dead_mask [M] is True.
    k_aux must not exceed the number of dead latents (so every pick is dead).

    The top-k runs over the dead columns only: masking the live ones to -inf and searching all M
    columns cost a second full-width top-k per step, which halved a CPU step when many were dead."""
    dead_cols = dead_mask.nonzero().squeeze(1)
    sub = select_topk(z.index_select(1, dead_cols), k_aux)
    return Selection(sub.rows, dead_cols[sub.cols], sub.offsets, z.shape[1], sub.values, z, _version(z))


@torch.no_grad()
def select_dead_topk_encoded(x_c: Tensor, w_enc: Tensor, b_enc: Tensor, dead_mask: Tensor, k_aux: int) -> Selection:
    """`select_dead_topk` where no [B, M] z was kept (`encode_topk`): the dead latents' pre-activations
    x_c @ w_enc[dead].T + b_enc[dead] are computed for the search, a GEMM over the dead rows only, and
    the kept ones are the Selection's `values` (for `gather_preacts` with z=None)."""
    dead_cols = dead_mask.nonzero().squeeze(1)
    sub = encode_topk(x_c, w_enc.detach()[dead_cols], b_enc.detach()[dead_cols], k_aux)
    return Selection(sub.rows, dead_cols[sub.cols], sub.offsets, w_enc.shape[0], sub.values)


@torch.no_grad()
def select_dead_topk_masked(z: Tensor, dead_mask: Tensor, k_aux: int) -> tuple[Selection, Tensor]:
    """AuxK without data-dependent shapes (no host-device sync, for GPUs): per-row top k_aux of z [B, M]
    with the live columns masked to -inf -> (Selection of exactly k_aux per row, keep [N] bool: the
    entry is a dead latent). With fewer than k_aux dead latents the surplus picks are live ones with
    keep False; weighting the values by keep gives what `select_dead_topk` with k_aux = min(k_aux,
    n_dead) gives."""
    masked = z.masked_fill(~dead_mask, float("-inf"))
    sel = select_topk(masked, min(k_aux, z.shape[1]))
    return sel, dead_mask[sel.cols]  # its values are `masked`'s, so gather_preacts(z, ...) reads z
