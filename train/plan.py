"""A run's length and every schedule default, resolved once from the config and the cache's size.

Where the config leaves a value unset it becomes a fraction of the run, so that a short run (a few
hundred steps) still exercises the warm-ups, the dead-latent window and BatchTopK's threshold
estimate (SAE_REFERENCE.md, project decisions). Libraries that wait a fixed 1,000 steps or 10M
tokens never start them in such a run (ANCHORS.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from settings import TrainingConfig
from train.schedule import LRSchedule, make_lr_schedule

SPARSITY_WARMUP_FRACTION = 0.05
DEAD_WINDOW_FRACTION = 0.25
DEAD_WINDOW_MAX_TOKENS = 10_000_000
THRESHOLD_START_FRACTION = 0.10
CHECKPOINTS_PER_RUN = 4


class PlanError(ValueError):
    """A budget or schedule setting that cannot be used; the message names the key."""


@dataclass(frozen=True)
class RunPlan:
    total_steps: int
    total_tokens: int
    batch_size: int  # tokens per step (the last batch of an epoch may be shorter)
    rows_per_epoch: int
    batches_per_epoch: int
    lr: LRSchedule
    sparsity_warmup_steps: int
    dead_threshold_tokens: int  # a latent silent for this many tokens counts as dead (AuxK)
    threshold_start_step: int  # BatchTopK/Matryoshka threshold estimate starts here
    checkpoint_every: int
    log_every: int

    @property
    def epochs(self) -> float:
        return self.total_tokens / self.rows_per_epoch

    def tokens_after(self, steps: int) -> int:
        """Tokens consumed by the first `steps` steps (epochs end with a possibly short batch)."""
        full, rest = divmod(steps, self.batches_per_epoch)
        return full * self.rows_per_epoch + min(rest * self.batch_size, self.rows_per_epoch)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_run(t: TrainingConfig, rows_per_epoch: int, batches_per_epoch: int) -> RunPlan:
    """Resolve the budget (`tokens`, else `steps`, else `num_epochs`) and the fraction defaults."""
    if rows_per_epoch < 1 or batches_per_epoch < 1:
        raise PlanError("the cache's train split is empty: nothing to train on; harvest more tokens")
    if t.batch_size < 1:
        raise PlanError(f"training.batch_size={t.batch_size} must be a positive number of tokens")
    total = _total_steps(t, rows_per_epoch, batches_per_epoch)
    lr = make_lr_schedule(t.lr_schedule, total, t.num_warmup_steps, t.lr_end_fraction)
    plan = RunPlan(
        total_steps=total,
        total_tokens=0,
        batch_size=t.batch_size,
        rows_per_epoch=rows_per_epoch,
        batches_per_epoch=batches_per_epoch,
        lr=lr,
        sparsity_warmup_steps=_or(t.sparsity_warmup_steps, round(SPARSITY_WARMUP_FRACTION * total)),
        dead_threshold_tokens=0,
        threshold_start_step=_or(t.threshold_start_step, round(THRESHOLD_START_FRACTION * total)),
        checkpoint_every=_or(t.checkpoint_every, math.ceil(total / CHECKPOINTS_PER_RUN)),
        log_every=max(1, t.log_every),
    )
    tokens = plan.tokens_after(total)
    dead = t.dead_feature_threshold
    if dead is None:
        dead = max(t.batch_size, min(DEAD_WINDOW_MAX_TOKENS, round(DEAD_WINDOW_FRACTION * tokens)))
    _check_positive(t, plan.checkpoint_every, dead)
    return replace(plan, total_tokens=tokens, dead_threshold_tokens=dead)


def describe(plan: RunPlan) -> list[str]:
    """Lines for the log: the budget and, when it exceeds the cache, how many epochs that means."""
    lines = [
        f"{plan.total_steps} steps of {plan.batch_size} tokens = {plan.total_tokens:,} tokens "
        f"({plan.epochs:.2f} epochs of {plan.rows_per_epoch:,} training rows)",
        f"lr schedule {plan.lr.kind}, warm-up {plan.lr.warmup_steps} steps; sparsity warm-up "
        f"{plan.sparsity_warmup_steps} steps; dead after {plan.dead_threshold_tokens:,} silent tokens; "
        f"threshold estimate from step {plan.threshold_start_step}; checkpoint every {plan.checkpoint_every} steps",
    ]
    if plan.total_tokens > plan.rows_per_epoch:
        lines.append(
            f"the budget ({plan.total_tokens:,} tokens) exceeds the cache ({plan.rows_per_epoch:,} training rows): "
            f"running {math.ceil(plan.epochs)} epochs, each in a new seeded order"
        )
    return lines


def _total_steps(t: TrainingConfig, rows: int, per_epoch: int) -> int:
    if t.tokens is not None:
        if t.tokens < 1:
            raise PlanError(f"training.tokens={t.tokens} must be positive")
        full, rest = divmod(t.tokens, rows)
        return full * per_epoch + math.ceil(rest / t.batch_size)
    if t.steps is not None:
        if t.steps < 1:
            raise PlanError(f"training.steps={t.steps} must be positive")
        return t.steps
    if t.num_epochs <= 0:
        raise PlanError(f"training.num_epochs={t.num_epochs} must be positive (or set training.tokens or steps)")
    return max(1, math.ceil(t.num_epochs * per_epoch))


def _check_positive(t: TrainingConfig, checkpoint_every: int, dead: int) -> None:
    if checkpoint_every < 1:
        raise PlanError(f"training.checkpoint_every={t.checkpoint_every} must be a positive number of steps")
    if dead < 1:
        raise PlanError(f"training.dead_feature_threshold={t.dead_feature_threshold} must be a positive token count")
    for key in ("sparsity_warmup_steps", "threshold_start_step"):
        value = getattr(t, key)
        if value is not None and value < 0:
            raise PlanError(f"training.{key}={value} must be >= 0")


def _or(value: int | None, default: int) -> int:
    return default if value is None else value

