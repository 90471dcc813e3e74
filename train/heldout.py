"""A quick held-out pass after training: FVU, L0 and dead latents in the SAE's inference mode.

Kept apart from the loop so that the evaluation stage can reuse or replace it. FVU here is the
split-mean form (SAE_REFERENCE.md): sum ||x - xhat||^2 / sum ||x - mean_split(x)||^2, accumulated
in float64; sum ||x - mean||^2 = sum ||x||^2 - N ||mean||^2 lets one pass suffice.
"""

from __future__ import annotations

from typing import Any

import torch

from sae import BaseSAE


@torch.no_grad()
def heldout_summary(
    model: BaseSAE, cache: Any, layers: int | list[int], *, batch_size: int = 4096,
    device: torch.device | str = "cpu", max_rows: int | None = None,
) -> dict[str, Any]:
    """Run `model` in eval mode over the held-out split (at most `max_rows` rows) ->
    {rows, fvu, l0, dead_fraction}. x is read as [n, d] (one layer) or [n, L, d] (routed)."""
    was_training = model.training
    model.eval()
    acc = _Accumulator(model.d_sae)
    try:
        for x in _heldout_chunks(cache, layers, batch_size, max_rows):
            out = model(x.to(device=device, dtype=torch.float32))
            acc.add(out["target"], out["sae_out"], out["feature_acts"])
    finally:
        model.train(was_training)
    return acc.summary()


def _heldout_chunks(cache: Any, layers: int | list[int], batch_size: int, max_rows: int | None):
    left = cache.num_rows("heldout") if max_rows is None else min(max_rows, cache.num_rows("heldout"))
    for info in cache.shards("heldout"):
        for start in range(0, info.rows, batch_size):
            if left <= 0:
                return
            stop = min(info.rows, start + batch_size, start + left)
            left -= stop - start
            yield cache.read("heldout", info.index, layers, start, stop)


class _Accumulator:
    def __init__(self, d_sae: int):
        self.rows = 0
        self.sq_err = 0.0
        self.sum_x: torch.Tensor | None = None
        self.sum_sq = 0.0
        self.active = 0
        self.ever_fired = torch.zeros(d_sae, dtype=torch.bool)

    def add(self, target: torch.Tensor, recon: torch.Tensor, acts: torch.Tensor) -> None:
        t, r = target.double(), recon.double()
        self.rows += t.shape[0]
        self.sq_err += (t - r).pow(2).sum().item()
        s = t.sum(dim=0).cpu()
        self.sum_x = s if self.sum_x is None else self.sum_x + s
        self.sum_sq += t.pow(2).sum().item()
        nz = acts != 0
        self.active += int(nz.sum().item())
        self.ever_fired |= nz.any(dim=0).cpu()

    def summary(self) -> dict[str, Any]:
        if self.rows == 0:
            return {"rows": 0, "fvu": None, "l0": None, "dead_fraction": None}
        centred = self.sum_sq - (self.sum_x.pow(2).sum().item() / self.rows)
        return {
            "rows": self.rows,
            "fvu": self.sq_err / centred if centred > 0 else float("nan"),
            "l0": self.active / self.rows,
            "dead_fraction": 1.0 - self.ever_fired.double().mean().item(),
        }
