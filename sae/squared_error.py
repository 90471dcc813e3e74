"""The reconstruction term sum ||target - recon||^2 in as few passes over [B, d] as the math needs.

Written out as `(target - recon).pow(2).sum()`, autograd makes five passes over the [B, d] rows
(difference, square, and in the backward the square's derivative from an expanded scalar gradient,
twice, then a negation), each a fresh [B, d] tensor. On a CPU whose rows do not stay in cache those
passes cost more than the step's sparse decode (bench/RESULTS.md, "The TopK step"). Here the forward
is the difference, its square and one sum, and the backward one multiplication per input that needs
it; the gradient does not depend on how the forward's sum was rounded. The sum is torch's pairwise
one: `torch.linalg.vector_norm` would save the square's pass, but on the CPU it adds nearly in sequence
(relative error 1e-4 at 4096 x 768 in float32, 1e-2 at 16384 x 4096, against ~1e-7 pairwise).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


class _SquaredErrorSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, target: Tensor, recon: Tensor) -> Tensor:  # noqa: D401
        diff = target - recon
        ctx.save_for_backward(diff)
        return diff.square().sum()

    @staticmethod
    @once_differentiable  # the second derivative (2 * identity) is not needed by any trainer: refuse, not guess
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        (diff,) = ctx.saved_tensors
        g_target = diff * (2 * grad) if ctx.needs_input_grad[0] else None
        g_recon = diff * (-2 * grad) if ctx.needs_input_grad[1] else None
        return g_target, g_recon


def squared_error_sum(target: Tensor, recon: Tensor) -> Tensor:
    """sum over all entries of (target - recon)^2, a scalar, differentiable in both inputs (same shape)."""
    if target.shape != recon.shape:
        raise ValueError(f"target and recon must have the same shape, got {tuple(target.shape)} and "
                         f"{tuple(recon.shape)}")
    return _SquaredErrorSum.apply(target, recon)


@torch.no_grad()
def centred_sum_of_squares(x: Tensor) -> Tensor:
    """sum ||x - mean_batch(x)||^2 over the rows of x [B, d]: FVU's denominator (a pairwise sum, see above)."""
    return (x - x.mean(dim=0)).square().sum()
