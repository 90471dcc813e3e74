"""Learning-rate and sparsity schedules, as pure functions of the step.

Being pure (no state beyond the step number) is what makes resume exact: a resumed run recomputes
the same factor for step s that the uninterrupted run used, with nothing to save but s.

Conventions, for a run of `total` optimiser steps numbered 0..total-1:
- Warm-up of W steps: step s < W uses (s + 1) / W, so the first step already moves the weights
  and step W-1 reaches the full rate (a factor s / W would waste step 0 at lr = 0).
- Linear decay from step D to the end: factor e + (1 - e) * (total - s) / (total - D), which is 1 at
  s = D and reaches the end fraction e one step after the last step.
- `route` is the RouteSAE paper's schedule (arXiv 2503.08200 §3.1): linear warm-up for the first 5%
  of steps, constant until 80%, then linear decay to 0 (5/75/20).
- Sparsity warm-up: lambda * (s + 1) / W_s for s < W_s, then lambda.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LR_SCHEDULES = ("constant", "linear", "cosine", "route")
ROUTE_WARMUP_FRACTION = 0.05
ROUTE_DECAY_START_FRACTION = 0.80


@dataclass(frozen=True)
class LRSchedule:
    """A resolved schedule: `factor(step)` multiplies the base learning rate."""

    kind: str
    total_steps: int
    warmup_steps: int
    decay_start: int  # first step of the decay phase (== warmup_steps for linear/cosine)
    end_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.kind!r}; valid: {', '.join(LR_SCHEDULES)}")
        if self.total_steps < 1:
            raise ValueError(f"a schedule needs at least one step, got total_steps={self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"num_warmup_steps={self.warmup_steps} must lie in 0..{self.total_steps} (the run's steps)"
            )
        if not 0.0 <= self.end_fraction <= 1.0:
            raise ValueError(f"lr_end_fraction={self.end_fraction} must lie in [0, 1]")

    def factor(self, step: int) -> float:
        """Multiplier of the base lr at optimiser step `step` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant" or step < self.decay_start:
            return 1.0
        span = self.total_steps - self.decay_start
        if span <= 0:
            return 1.0
        remaining = (self.total_steps - step) / span  # 1 at decay_start, 1/span at the last step
        e = self.end_fraction
        if self.kind == "cosine":
            return e + (1.0 - e) * 0.5 * (1.0 - math.cos(math.pi * remaining))
        return e + (1.0 - e) * remaining


def make_lr_schedule(
    kind: str, total_steps: int, warmup_steps: int | None = None, end_fraction: float = 0.0
) -> LRSchedule:
    """Resolve a config's schedule. `warmup_steps=None` means 0, except for `route` (5% of the run).
    `route` decays from 80% of the run to 0, so `end_fraction` is ignored for it."""
    if kind == "route":
        warm = round(ROUTE_WARMUP_FRACTION * total_steps) if warmup_steps is None else warmup_steps
        decay = max(warm, round(ROUTE_DECAY_START_FRACTION * total_steps))
        return LRSchedule("route", total_steps, warm, decay, 0.0)
    warm = 0 if warmup_steps is None else warmup_steps
    return LRSchedule(kind, total_steps, warm, warm, end_fraction)


def sparsity_factor(step: int, warmup_steps: int) -> float:
    """Multiplier of the sparsity coefficient at step `step`: linear 0 -> 1 over `warmup_steps`."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return (step + 1) / warmup_steps
