"""Schedules and the run plan, against values computed by hand."""

import math

import pytest

from settings import TrainingConfig
from train.plan import PlanError, describe, plan_run
from train.schedule import LRSchedule, make_lr_schedule, sparsity_factor


def test_route_schedule_is_5_75_20():
    # 100 steps: warm-up over steps 0..4 (factor (s+1)/5), constant to step 79, then (100 - s)/20.
    s = make_lr_schedule("route", 100)
    assert (s.warmup_steps, s.decay_start) == (5, 80)
    expected = {0: 0.2, 2: 0.6, 4: 1.0, 5: 1.0, 50: 1.0, 79: 1.0, 80: 1.0, 90: 0.5, 95: 0.25, 99: 0.05}
    for step, value in expected.items():
        assert s.factor(step) == pytest.approx(value), step


def test_route_schedule_ignores_end_fraction_and_honours_explicit_warmup():
    s = make_lr_schedule("route", 200, warmup_steps=20, end_fraction=0.5)
    assert s.factor(9) == pytest.approx(0.5)  # (9 + 1) / 20
    assert s.factor(199) == pytest.approx(1 / 40)  # decays to 0, not to 0.5: (200 - 199) / (200 - 160)


def test_linear_and_cosine_decay_to_end_fraction():
    lin = make_lr_schedule("linear", 10, warmup_steps=2, end_fraction=0.1)
    # decay from step 2: 0.1 + 0.9 * (10 - s) / 8
    assert [round(lin.factor(s), 6) for s in (0, 1, 2, 6, 9)] == [0.5, 1.0, 1.0, 0.55, 0.2125]
    cos = make_lr_schedule("cosine", 10, warmup_steps=0, end_fraction=0.0)
    # 0.5 * (1 - cos(pi * (10 - s) / 10)): 1 at s = 0, 0.5 at s = 5
    assert cos.factor(0) == pytest.approx(1.0)
    assert cos.factor(5) == pytest.approx(0.5)
    assert cos.factor(9) == pytest.approx(0.5 * (1 - math.cos(math.pi * 0.1)))


def test_constant_schedule_with_warmup():
    s = make_lr_schedule("constant", 50, warmup_steps=4)
    assert [s.factor(i) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert s.factor(49) == 1.0


def test_sparsity_warmup():
    assert [sparsity_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert sparsity_factor(0, 0) == 1.0


@pytest.mark.parametrize("kwargs", [dict(kind="nope"), dict(warmup_steps=11), dict(total_steps=0),
                                    dict(end_fraction=1.5)])
def test_bad_schedules_are_refused(kwargs):
    args = dict(kind="linear", total_steps=10, warmup_steps=0, decay_start=0, end_fraction=0.0) | kwargs
    with pytest.raises(ValueError):
        LRSchedule(**args)


def test_plan_defaults_are_fractions_of_the_run():
    # 1000 rows, batch 128: 8 batches per epoch (7 x 128 + 104); 3 epochs = 24 steps.
    plan = plan_run(TrainingConfig(batch_size=128, num_epochs=3.0), 1000, 8)
    assert plan.total_steps == 24
    assert plan.total_tokens == 3000
    assert plan.sparsity_warmup_steps == round(0.05 * 24)
    assert plan.threshold_start_step == round(0.1 * 24)
    assert plan.dead_threshold_tokens == 750  # a quarter of the run's 3000 tokens
    assert plan.checkpoint_every == 6
    assert plan.lr.warmup_steps == 0


def test_dead_window_is_capped_at_10m_tokens_and_explicit_values_win():
    plan = plan_run(TrainingConfig(batch_size=4096, tokens=100_000_000), 1_000_000, 245)
    assert plan.dead_threshold_tokens == 10_000_000
    t = TrainingConfig(batch_size=128, steps=100, dead_feature_threshold=5000, sparsity_warmup_steps=7,
                       threshold_start_step=3, num_warmup_steps=9, checkpoint_every=33)
    plan = plan_run(t, 1000, 8)
    assert (plan.dead_threshold_tokens, plan.sparsity_warmup_steps, plan.threshold_start_step) == (5000, 7, 3)
    assert (plan.lr.warmup_steps, plan.checkpoint_every) == (9, 33)


def test_token_budget_counts_short_last_batches_and_says_when_it_exceeds_the_cache():
    # 1000 rows, batch 128 (8 batches, the last of 104 rows). 2500 tokens = 2 epochs + 500 rows = 16 + 4 steps.
    plan = plan_run(TrainingConfig(batch_size=128, tokens=2500), 1000, 8)
    assert plan.total_steps == 20
    assert plan.tokens_after(20) == 2000 + 4 * 128
    assert plan.tokens_after(8) == 1000
    assert any("exceeds the cache" in line and "3 epochs" in line for line in describe(plan))
    small = plan_run(TrainingConfig(batch_size=128, steps=4), 1000, 8)
    assert not any("exceeds" in line for line in describe(small))


@pytest.mark.parametrize("kwargs,key", [(dict(tokens=0), "tokens"), (dict(steps=-1), "steps"),
                                        (dict(num_epochs=0.0), "num_epochs"), (dict(batch_size=0), "batch_size"),
                                        (dict(steps=10, dead_feature_threshold=0), "dead_feature_threshold")])
def test_bad_budgets_name_the_key(kwargs, key):
    with pytest.raises(PlanError, match=key):
        plan_run(TrainingConfig(**kwargs), 1000, 8)
