"""The one-pass reconstruction term against autograd of the plain formula."""

from __future__ import annotations

import pytest
import torch

from sae.squared_error import centred_sum_of_squares, squared_error_sum


@pytest.mark.parametrize("needs", [(True, True), (False, True), (True, False)])
def test_value_and_gradients_match_the_plain_formula(needs):
    g = torch.Generator().manual_seed(0)
    t0, r0 = (torch.randn(64, 24, generator=g, dtype=torch.float64) for _ in range(2))
    t1, r1 = t0.clone().requires_grad_(needs[0]), r0.clone().requires_grad_(needs[1])
    t2, r2 = t0.clone().requires_grad_(needs[0]), r0.clone().requires_grad_(needs[1])
    w = torch.randn((), generator=g, dtype=torch.float64)  # an upstream gradient other than 1
    got = squared_error_sum(t1, r1)
    ref = ((t2 - r2) ** 2).sum()
    assert torch.allclose(got, ref, rtol=1e-12)
    (got * w).backward()
    (ref * w).backward()
    for a, b, need in ((t1, t2, needs[0]), (r1, r2, needs[1])):
        assert (a.grad is None) == (not need)
        if need:
            assert torch.allclose(a.grad, b.grad, rtol=1e-12, atol=0)


def test_a_float32_target_and_bf16_recon_get_gradients_in_their_own_dtypes():
    t = torch.randn(8, 4, requires_grad=True)
    r = torch.randn(8, 4).bfloat16().requires_grad_(True)
    squared_error_sum(t, r).backward()
    assert t.grad.dtype == torch.float32 and r.grad.dtype == torch.bfloat16
    assert torch.allclose(r.grad.float(), -2 * (t.detach() - r.detach().float()), rtol=1e-2)


def test_shapes_must_match_and_a_second_derivative_is_refused():
    with pytest.raises(ValueError, match="same shape"):
        squared_error_sum(torch.zeros(3, 2), torch.zeros(2))
    r = torch.randn(5, 3, requires_grad=True)
    (g,) = torch.autograd.grad(squared_error_sum(torch.zeros(5, 3), r), r, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def test_centred_sum_of_squares_is_the_fvu_denominator():
    x = torch.randn(100, 7, dtype=torch.float64) * 3 + 5
    ref = sum(float(((row - x.mean(0)) ** 2).sum()) for row in x)
    assert float(centred_sum_of_squares(x)) == pytest.approx(ref, rel=1e-12)


def test_float32_sums_of_a_large_batch_stay_near_float64():
    # 4096 x 768 float32 entries: a sum that adds nearly in sequence is off by ~1e-4 here (the CPU's
    # vector_norm was), a pairwise one by ~1e-7; logged losses and FVU must be the latter.
    g = torch.Generator().manual_seed(3)
    t, r = torch.randn(4096, 768, generator=g), torch.randn(4096, 768, generator=g)
    ref = float(((t.double() - r.double()) ** 2).sum())
    assert float(squared_error_sum(t, r)) == pytest.approx(ref, rel=1e-6)
    x = t * 2 + 3
    ref_c = float(((x.double() - x.double().mean(0)) ** 2).sum())
    assert float(centred_sum_of_squares(x)) == pytest.approx(ref_c, rel=1e-6)
