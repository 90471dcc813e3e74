"""What an SAE needs from the other processes of a data-parallel run, and the single-process default.

Under `torchrun` every rank trains on its rows of one global batch. Some of an SAE's training
behaviour is a statement about the global batch: BatchTopK keeps the k*B largest pre-activations of
the *global* batch, its threshold estimate is the smallest kept value over all ranks, and AuxK divides
by the global batch's residual variance. The SAE computes those itself through a `Collective`: the
trainer hands it one (train/distributed.py implements it with torch.distributed) and a single
process uses `LOCAL`, whose reductions do nothing, so the one-process arithmetic is untouched.

`global_batch` is the part every architecture shares: the global batch size, the token weight of
this rank, and the global residual statistics that FVU and AuxK's normaliser need.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


class Collective(Protocol):
    """Reductions over the ranks of a data-parallel run (in place where torch.distributed is)."""

    world: int

    def all_sum(self, t: Tensor) -> Tensor:
        """Sum of `t` over ranks (every rank gets it)."""
        ...

    def all_min(self, t: Tensor) -> Tensor:
        """Elementwise minimum of `t` over ranks."""
        ...

    def all_gather(self, t: Tensor) -> list[Tensor]:
        """`t` from every rank, in rank order (same shape everywhere)."""
        ...


class Local:
    """One process: every reduction is the identity."""

    world = 1

    def all_sum(self, t: Tensor) -> Tensor:
        return t

    def all_min(self, t: Tensor) -> Tensor:
        return t

    def all_gather(self, t: Tensor) -> list[Tensor]:
        return [t]


LOCAL = Local()


@dataclass(frozen=True)
class GlobalBatch:
    """The global batch as seen from one rank (float64 sums over every rank's rows)."""

    world: int  # ranks
    n_local: int  # this rank's rows
    n: int  # the global batch's rows
    err_var: Tensor  # sum_t ||e_t - mean(e)||^2, e = target - sae_out, mean over the global batch
    err_sq: Tensor  # sum_t ||e_t||^2
    target_var: Tensor  # sum_t ||x_t - mean(x)||^2

    @property
    def token_weight(self) -> float:
        """W * n_local / n: a per-token mean scaled by it, with gradients averaged over ranks,
        back-propagates as the global-batch mean."""
        return self.world * self.n_local / self.n

    def fvu(self) -> Tensor:
        return self.err_sq / self.target_var.clamp_min(1e-12)


@torch.no_grad()
def global_batch(out: dict[str, Tensor], c: Collective) -> GlobalBatch:
    """Two small all-reduces: row counts and sums, then the centred sums of squares."""
    target, recon = out["target"].detach(), out["sae_out"].detach()
    flat_t = target.reshape(target.shape[0], -1).double()
    e = flat_t - recon.reshape(recon.shape[0], -1).double()
    n_local = target.shape[0]
    first = c.all_sum(torch.cat([e.sum(0), flat_t.sum(0), e.new_tensor([n_local])]))
    n = int(first[-1].item())
    d = e.shape[1]
    mean_e, mean_t = first[:d] / n, first[d:2 * d] / n
    second = c.all_sum(torch.stack([(e - mean_e).pow(2).sum(), e.pow(2).sum(), (flat_t - mean_t).pow(2).sum()]))
    return GlobalBatch(c.world, n_local, n, second[0], second[1], second[2])
