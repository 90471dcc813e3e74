"""Per-row top-k selection is exact: the kept values are a top-k of each row as `torch.topk` defines it
(ties included: any k entries whose values are the k largest, each entry once), in float32 and bf16."""

import pytest
import torch

from sae.selection import blocked_topk_indices, row_topk_indices, select_topk


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
