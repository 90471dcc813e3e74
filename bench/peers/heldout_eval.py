"""One held-out evaluation for every implementation, so that the numbers compare.

FVU = sum_t ||x_t - xhat_t||^2 / sum_t ||x_t - mean(x)||^2 with mean(x) over the whole held-out
split, accumulated in float64 (SAE_REFERENCE.md, project decisions); L0 = mean number of non-zero
latents per token; dead = share of latents never non-zero on the held-out tokens. FVU does not
depend on the units, so each implementation reports target and reconstruction in its own (raw or
scaled) units, as long as both are in the same ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

# x [n, d] raw -> (target [n, d], reconstruction [n, d], latents [n, d_sae]) in the model's inference mode
InferenceFn = Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]


class HeldoutMeter:
    def __init__(self, d_sae: int):
        self.rows = 0
        self.sq_err = 0.0
        self.sum_x: Tensor | None = None
        self.sum_sq = 0.0
        self.active = 0
        self.ever = torch.zeros(d_sae, dtype=torch.bool)

    def add(self, target: Tensor, recon: Tensor, latents: Tensor) -> None:
        """target, recon [n, d]; latents [n, d_sae] (non-zero = active)."""
        if target.shape != recon.shape or latents.shape[0] != target.shape[0] or latents.shape[1] != self.ever.shape[0]:
            raise ValueError(f"shapes do not fit: target {tuple(target.shape)}, recon {tuple(recon.shape)}, "
                             f"latents {tuple(latents.shape)} for d_sae={self.ever.shape[0]}")
        t, r = target.detach().double(), recon.detach().double()
        self.rows += t.shape[0]
        self.sq_err += float((t - r).pow(2).sum())
        s = t.sum(dim=0)
        self.sum_x = s if self.sum_x is None else self.sum_x + s
        self.sum_sq += float(t.pow(2).sum())
        nz = latents.detach() != 0
        self.active += int(nz.sum())
        self.ever |= nz.any(dim=0)

    def summary(self) -> dict[str, float | int]:
        if self.rows == 0 or self.sum_x is None:
            raise ValueError("no held-out rows were evaluated")
        centred = self.sum_sq - float(self.sum_x.pow(2).sum()) / self.rows
        return {"heldout_rows": self.rows, "fvu": self.sq_err / centred, "l0": self.active / self.rows,
                "dead_fraction": 1.0 - float(self.ever.double().mean())}


@torch.no_grad()
def evaluate(fn: InferenceFn, chunks: Iterable[Tensor], d_sae: int) -> dict[str, float | int]:
    """Run `fn` over the held-out chunks -> {heldout_rows, fvu, l0, dead_fraction}."""
    meter = HeldoutMeter(d_sae)
    for x in chunks:
        meter.add(*fn(x))
    return meter.summary()
