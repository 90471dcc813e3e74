"""Reconstruction and sparsity metrics, accumulated in float64 over batches of a whole split.

Definitions (one place; names match the published ones so figures compare):
- `fvu` = sum_t ||x_t - xhat_t||^2 / sum_t ||x_t - mean(x)||^2, mean(x) over the WHOLE split
  (project decision, SAE_REFERENCE.md). Accumulated with sum ||x - m||^2 = sum ||x||^2 - n ||m||^2.
- `explained_variance` = 1 - fvu.
- `explained_variance_legacy`: SAELens' per-token form, mean_t [1 - ||x_t - xhat_t||^2 /
  ||x_t - mean_batch(x)||^2], with the mean over the evaluation *batch* (SAELens
  `training/sae_trainer.py::_build_train_step_log_dict` and `evals.py::get_sparsity_and_variance_metrics`).
  It depends on the batch size and is dominated by low-variance tokens; kept for comparison only.
- `mse` = mean_t ||x_t - xhat_t||^2 (sum over d), as the training losses use it.
- `l1` = mean_t sum_j |f_tj|; `l0` = mean_t #{j : f_tj != 0}.
- `cosine_similarity` = mean_t cos(x_t, xhat_t); `l2_ratio` = mean_t ||xhat_t|| / ||x_t|| (DL, SAEBench).
- `relative_reconstruction_bias` = E||xhat||^2 / E[xhat . x] (Gated SAE paper eq. 10, as DL and
  SAEBench compute it): 1 means unbiased, < 1 means shrinkage.
- dead latents never fire on the split; dense latents fire on more than `dense_threshold` of tokens.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_EPS = 1e-12


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """Fraction of variance unexplained of one whole split held in memory. x, x_hat: [n, d]."""
    x, x_hat = x.double(), x_hat.double()
    total = (x - x.mean(dim=0)).pow(2).sum()
    return float((x - x_hat).pow(2).sum() / total) if total > 0 else math.nan


def explained_variance(x: Tensor, x_hat: Tensor) -> float:
    """1 - FVU. x, x_hat: [n, d]."""
    return 1.0 - fvu(x, x_hat)


class ReconAccumulator:
    """Streams batches (x [B, d], x_hat [B, d], latents [B, M]) and keeps float64 sums, so that a
    split of any size is measured exactly without holding it."""

    def __init__(self, d_in: int, d_sae: int | None = None):
        self.n = 0
        self.sum_x = torch.zeros(d_in, dtype=torch.float64)
        self.sum_x_sq = 0.0
        self.sum_err = 0.0
        self.sum_xhat_sq = 0.0
        self.sum_dot = 0.0
        self.sum_cos = 0.0
        self.sum_l2_ratio = 0.0
        self.sum_ev_legacy = 0.0
        self.sum_l1 = 0.0
        self.sum_l0 = 0.0
        self.fire_count = torch.zeros(d_sae, dtype=torch.int64) if d_sae else None

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, latents: Tensor | None = None) -> None:
        """x, x_hat: [B, d] in the same units; latents: [B, M] (omit for reconstruction-only)."""
        x, x_hat = x.detach().double().cpu(), x_hat.detach().double().cpu()
        err = (x - x_hat).pow(2).sum(dim=1)
        x_norm, xh_norm = x.norm(dim=1), x_hat.norm(dim=1)
        dot = (x * x_hat).sum(dim=1)
        batch_var = (x - x.mean(dim=0)).pow(2).sum(dim=1)
        self.n += x.shape[0]
        self.sum_x += x.sum(dim=0)
        self.sum_x_sq += float(x.pow(2).sum())
        self.sum_err += float(err.sum())
        self.sum_xhat_sq += float(xh_norm.pow(2).sum())
        self.sum_dot += float(dot.sum())
        self.sum_cos += float((dot / (x_norm * xh_norm).clamp_min(_EPS)).sum())
        self.sum_l2_ratio += float((xh_norm / x_norm.clamp_min(_EPS)).sum())
        self.sum_ev_legacy += float((1.0 - err / batch_var.clamp_min(_EPS)).sum())
        if latents is not None:
            latents = latents.detach()
            active = latents != 0
            self.sum_l1 += float(latents.abs().double().sum())
            self.sum_l0 += float(active.sum())
            if self.fire_count is not None:
                self.fire_count += active.sum(dim=0).cpu()

    def total_variance(self) -> float:
        """sum_t ||x_t - mean(x)||^2 over everything seen."""
        mean = self.sum_x / max(self.n, 1)
        return self.sum_x_sq - self.n * float(mean.pow(2).sum())

    def result(self, dense_threshold: float = 0.1) -> dict[str, float]:
        """The metrics named in the module docstring (feature density is `density()`)."""
        if self.n == 0:
            raise ValueError("no tokens were evaluated: the held-out split is empty or max_tokens is 0")
        n = self.n
        total = self.total_variance()
        f = self.sum_err / total if total > 0 else math.nan
        out = {
            "tokens": n,
            "mse": self.sum_err / n,
            "fvu": f,
            "explained_variance": 1.0 - f,
            "explained_variance_legacy": self.sum_ev_legacy / n,
            "cosine_similarity": self.sum_cos / n,
            "l2_ratio": self.sum_l2_ratio / n,
            "relative_reconstruction_bias": self.sum_xhat_sq / self.sum_dot if self.sum_dot != 0 else math.nan,
        }
        if self.fire_count is not None:
            density = self.density()
            m = density.numel()
            dead = int((self.fire_count == 0).sum())
            dense = int((density > dense_threshold).sum())
            out.update({
                "l1": self.sum_l1 / n,
                "l0": self.sum_l0 / n,
                "dead": dead,
                "dead_fraction": dead / m,
                "dense": dense,
                "dense_fraction": dense / m,
            })
        return out

    def density(self) -> Tensor:
        """[M] float64: share of tokens on which each latent fired."""
        if self.fire_count is None:
            raise ValueError("this accumulator was built without latents (d_sae=None)")
        return self.fire_count.double() / max(self.n, 1)


def density_histogram(density: Tensor, bins: int = 40) -> dict[str, list[float] | int]:
    """log10-density histogram of the latents that fire ([M] -> counts per bin), plus the dead count,
    the form in which the field shows feature density."""
    alive = density[density > 0]
    dead = int((density == 0).sum())
    if alive.numel() == 0:
        return {"edges": [], "counts": [], "dead": dead}
    logd = alive.double().log10()
    lo, hi = float(logd.min()), float(logd.max())
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    counts = torch.histc(logd, bins=bins, min=lo, max=hi)
    edges = torch.linspace(lo, hi, bins + 1)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts], "dead": dead}


_NO_VARIANCE = ("the rows have zero total variance (one row, or all rows equal), which FVU divides by: "
                "measure more rows (evaluate.max_tokens)")
# Why each metric of `result` can be NaN (its denominator is 0): written beside the null in
# eval.json and train_summary.json (durable.null_non_finite).
UNDEFINED_REASONS = {
    "fvu": _NO_VARIANCE, "explained_variance": _NO_VARIANCE,
    "relative_reconstruction_bias": "the SAE's output is orthogonal to its input (the ratio's denominator is 0)",
}
