"""Per-row top-k selection is exact: the kept values are a top-k of each row as `torch.topk` defines it
(ties included: any k entries whose values are the k largest, each entry once), in float32 and bf16."""

import pytest
import torch

from sae.selection import (
    blocked_topk_indices,
    row_topk,
    row_topk_indices,
    select_topk,
    strided_block_topk,
    strided_width,
)


def _check_exact(z: torch.Tensor, idx: torch.Tensor, k: int) -> None:
    ref = z.topk(k, dim=1).values  # the k largest values of each row, sorted (torch.topk, independent)
    assert idx.shape == (z.shape[0], k)
    picked = z.gather(1, idx).sort(dim=1, descending=True).values
    assert torch.equal(picked, ref)  # the same multiset of values, ties included
    assert (idx.sort(dim=1).values.diff(dim=1) > 0).all()  # every entry at most once


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k", [(3072, 32), (1000, 7), (64, 64), (129, 1)])
def test_row_topk_is_exact_on_random_rows(dtype, m, k):
    torch.manual_seed(m + k)
    z = torch.randn(37, m).to(dtype)
    _check_exact(z, row_topk_indices(z, k), k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_topk_is_exact_with_ties_at_and_above_the_cut(dtype):
    torch.manual_seed(1)
    m, k = 2048, 16
    # few distinct values: every row has long runs of equal values across the whole width, so the k-th
    # largest value is shared by many entries, in every block of the row
    z = torch.randint(0, 20, (9, m)).to(dtype)
    z[0] = 5.0  # a constant row: any k entries are a top-k
    z[1, :100] = 30.0  # more entries tie at the maximum than k
    z[2, -3:] = 40.0  # winners at the very end of the row
    z[3] = torch.linspace(-1, 1, m).to(dtype)  # bf16 rounds many of these to equal values
    _check_exact(z, row_topk_indices(z, k), k)


def test_select_topk_uses_it_and_keeps_the_selection_layout():
    torch.manual_seed(2)
    z = torch.randn(5, 300)
    sel = select_topk(z, 4)
    assert sel.rows.tolist() == [r for r in range(5) for _ in range(4)]
    assert sel.offsets.tolist() == [0, 4, 8, 12, 16]
    _check_exact(z, sel.cols.view(5, 4), 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_blocked_alternative_is_exact_too(dtype):
    torch.manual_seed(3)
    z = torch.randint(0, 20, (9, 2048)).to(dtype)
    z[1, :100] = 30.0
    _check_exact(z, blocked_topk_indices(z, 16, 8), 16)
    y = torch.randn(9, 2048).to(dtype)
    _check_exact(y, blocked_topk_indices(y, 16, 8), 16)
    with pytest.raises(ValueError, match="blocks"):
        blocked_topk_indices(z, 16, 7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [2, 8, 32])
def test_the_strided_block_selection_is_exact(dtype, width):
    torch.manual_seed(4)
    m, k = 2048, 16
    n_blocks = m // width
    z = torch.randn(12, m).to(dtype)
    z[0, 5::n_blocks] = 50.0  # a whole block of winners: the top-k may take several entries of one block
    z[1, 7::n_blocks] = torch.arange(width).to(dtype) + 40.0
    z[1, 9] = 45.0  # ... mixed with another block's
    z[2] = torch.randint(0, 3, (m,)).to(dtype)  # ties at the cut in every block
    z[3] = 1.0  # one value everywhere
    z[4, :] = -torch.arange(m).to(dtype)  # strictly decreasing (negative values)
    values, idx = strided_block_topk(z, k, width)
    _check_exact(z, idx, k)
    assert torch.equal(values, z.gather(1, idx))  # the values returned are those of the indices
    with pytest.raises(ValueError, match="blocks"):
        strided_block_topk(z, k, 3)  # 2048 does not split into blocks of 3
    with pytest.raises(ValueError, match="blocks"):
        strided_block_topk(z, 512, 8)  # 256 blocks < k


def test_row_topk_takes_the_strided_path_on_wide_cpu_rows_and_topk_elsewhere():
    assert strided_width(3072, 32) == 8  # about sqrt(3072 / 32) = 9.8, a power of two dividing 3072
    assert strided_width(12288, 32) == 16
    assert strided_width(1000, 7) is None  # narrow: torch.topk
    assert strided_width(3000, 32) == 8  # 3000 = 8 * 375
    assert strided_width(3001, 32) is None  # odd: no block width divides it
    assert strided_width(3072, 0) is None
    w = strided_width(4096, 1024)  # k large against M: keep at least 2k blocks, so w = 2
    assert w == 2 and 4096 // w >= 2 * 1024
    torch.manual_seed(5)
    z = torch.randn(6, 3072)
    values, idx = row_topk(z, 32)
    _check_exact(z, idx, 32)
    assert torch.equal(values, z.gather(1, idx))
    sel = select_topk(z, 32)
    assert torch.equal(sel.values, z[sel.rows, sel.cols])  # the selection keeps the values it found


def test_row_topk_takes_a_transposed_matrix():
    torch.manual_seed(6)
    z = torch.randn(2048, 10).t()  # [10, 2048], not contiguous
    _check_exact(z, row_topk(z, 16)[1], 16)


def _encode_reference(x, w, b, dtype):
    """z = x @ w.T + b as the fused encoder defines it: the product in `dtype`, the bias added in float32,
    the sum rounded to `dtype` (written out here, not taken from the code under test)."""
    return ((x.to(dtype) @ w.to(dtype).T).float() + b).to(dtype)


@pytest.mark.parametrize("native_kernel", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encode_topk_keeps_a_top_k_of_each_row_of_z_through_blocks_of_rows(monkeypatch, native_kernel, dtype):
    import sae.selection
    from sae.selection import encode_topk

    if not native_kernel:
        monkeypatch.setattr(sae.selection.native, "row_topk", lambda *args, **kwargs: None)
    # bf16 in blocks of 256 rows of 600 latents: 700 rows are two whole blocks and a partial one
    monkeypatch.setattr(sae.selection, "ENCODE_BLOCK_BYTES", 256 * 600 * 2)
    assert sae.selection.encode_block_rows(600, dtype, 700) == (256 if dtype == torch.bfloat16 else 700)
    torch.manual_seed(3)
    x, w, b, k = torch.randn(700, 24), torch.randn(600, 24), torch.randn(600), 9
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        sel = encode_topk(x, w, b, k)
    z = _encode_reference(x, w, b, dtype)
    cols, values = sel.cols.view(700, k), sel.values.view(700, k)
    assert values.dtype == dtype and sel.n_latents == 600 and sel.values_from is None
    assert torch.equal(z.gather(1, cols), values)  # the kept values are z's at the kept columns
    _check_exact(z, cols, k)
    assert torch.equal(sel.rows, torch.arange(700).repeat_interleave(k))
    assert torch.equal(sel.offsets, torch.arange(0, 700 * k, k))


def test_encode_topk_ranks_nan_first_as_torch_topk_does():
    from sae.selection import encode_topk

    x, w, b = torch.randn(5, 8), torch.randn(300, 8), torch.zeros(300)
    x[2, 0] = float("nan")  # the whole row of z is NaN
    b[17] = float("nan")  # column 17 is NaN in every row
    sel = encode_topk(x, w, b, 4)
    cols, values = sel.cols.view(5, 4), sel.values.view(5, 4)
    assert (cols[[0, 1, 3, 4]] == 17).any(dim=1).all()  # the NaN column is kept in every other row
    assert values[2].isnan().all()


@pytest.mark.parametrize("native_kernel", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encode_batch_topk_keeps_the_k_b_largest_of_z_saturated_rows_included(monkeypatch, native_kernel, dtype):
    import sae.selection
    from sae.selection import encode_batch_topk

    if not native_kernel:
        monkeypatch.setattr(sae.selection.native, "row_topk", lambda *args, **kwargs: None)
    torch.manual_seed(4)
    b, m, k = 120, 700, 5
    x, w, bias = torch.randn(b, 24), torch.randn(m, 24), torch.randn(m)
    x[7] *= 40  # a loud token: it holds far more than its 2k candidates of the batch's winners
    x[50] *= 25
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        sel = encode_batch_topk(x, w, bias, k)
    z = _encode_reference(x, w, bias, dtype).float()
    assert sel.values.dtype == dtype and sel.cols.shape == (k * b,)
    # A saturated row's values come from a GEMM over that row alone, which may round differently in the
    # last bit: equal up to one unit in the last place of the compute dtype.
    ulp = torch.finfo(dtype).eps * z.abs().max()
    assert (z[sel.rows, sel.cols] - sel.values.float()).abs().max() <= ulp  # the kept values are z's
    cut = z.reshape(-1).topk(k * b).values.min()  # independent: the k*B-th largest of the whole matrix
    kept = torch.zeros(b, m, dtype=torch.bool)
    kept[sel.rows, sel.cols] = True
    assert (z[kept] >= cut - ulp).all() and (z[~kept] <= cut + ulp).all()  # the k*B largest, up to rounding
    assert (sel.rows == 7).sum() > 2 * k  # the saturated row's extra winners were found
    flat = sel.rows * m + sel.cols
    assert (flat.diff() > 0).all()  # row-major, each entry once
    assert torch.equal(sel.offsets, torch.searchsorted(sel.rows, torch.arange(b)))


def test_encode_batch_topk_declines_when_the_candidates_are_the_whole_matrix():
    from sae.selection import encode_batch_topk

    assert encode_batch_topk(torch.randn(8, 4), torch.randn(10, 4), torch.zeros(10), 5) is None  # 2k >= M
