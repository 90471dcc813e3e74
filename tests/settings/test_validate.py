"""Every numeric setting is checked at load, and the error names the key (no traceback from deep inside
torch or the loader later)."""

import pytest

from settings import ConfigError, load_config


@pytest.mark.parametrize("override, key", [
    ("training.lr=-1", "training.lr"),
    ("training.lr=0", "training.lr"),
    ("training.lr=nan", "training.lr"),
    ("training.lr=.inf", "training.lr"),
    ("training.batch_size=0", "training.batch_size"),
    ("training.eps=0", "training.eps"),
    ("training.num_epochs=-1", "training.num_epochs"),
    ("training.steps=0", "training.steps"),
    ("training.tokens=-5", "training.tokens"),
    ("training.checkpoint_every=0", "training.checkpoint_every"),
    ("training.log_every=0", "training.log_every"),
    ("training.shuffle_buffer_rows=0", "training.shuffle_buffer_rows"),
    ("training.dead_feature_threshold=0", "training.dead_feature_threshold"),
    ("training.num_warmup_steps=-1", "training.num_warmup_steps"),
    ("training.sparsity_warmup_steps=-1", "training.sparsity_warmup_steps"),
    ("training.threshold_start_step=-1", "training.threshold_start_step"),
    ("training.l1_coefficient=-0.1", "training.l1_coefficient"),
    ("training.l1_coefficient=nan", "training.l1_coefficient"),
    ("training.lr_end_fraction=1.5", "training.lr_end_fraction"),
    ("training.gradient_clip_norm=0", "training.gradient_clip_norm"),
    ("training.betas=[0.9, 1.0]", "training.betas"),
    ("training.betas=[0.9]", "training.betas"),
    ("training.seed=-1", "training.seed"),
    ("harvest.batch_size=0", "harvest.batch_size"),
    ("harvest.shard_rows=0", "harvest.shard_rows"),
    ("harvest.shuffle_window=0", "harvest.shuffle_window"),
    ("harvest.max_tokens=0", "harvest.max_tokens"),
    ("data.max_length=0", "data.max_length"),
    ("data.max_samples=0", "data.max_samples"),
    ("data.heldout_fraction=1.5", "data.heldout_fraction"),
    ("data.heldout_fraction=nan", "data.heldout_fraction"),
    ("evaluate.batch_size=0", "evaluate.batch_size"),
    ("evaluate.max_tokens=0", "evaluate.max_tokens"),
    ("evaluate.downstream_sequences=-1", "evaluate.downstream_sequences"),
    ("evaluate.dense_threshold=2", "evaluate.dense_threshold"),
    ("evaluate.dashboard_contexts=0", "evaluate.dashboard_contexts"),
])
def test_a_value_out_of_range_is_refused_at_load_naming_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert message.startswith(key + "="), message  # the key first, once, with the value given
    assert "\n" not in message


def test_the_defaults_and_edge_values_pass():
    cfg = load_config(None, ["training.lr=1e-9", "training.batch_size=1", "training.gradient_clip_norm=null",
                             "training.l1_coefficient=0", "data.heldout_fraction=0", "training.lr_end_fraction=1",
                             "training.betas=[0, 0.999]", "evaluate.downstream_sequences=0"])
    assert cfg.training.lr == 1e-9 and cfg.training.batch_size == 1


def test_resume_and_overwrite_together_are_refused_at_load():
    with pytest.raises(ConfigError, match="training.resume and training.overwrite"):
        load_config(None, ["training.resume=true", "training.overwrite=true"])
