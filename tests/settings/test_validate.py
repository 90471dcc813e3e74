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


# The keys the first round of range checks left open (issue 17): each refused at load in one line that
# starts with the key and its value, and says what is allowed.
@pytest.mark.parametrize("override, start, allowed", [
    ("model.layer=-2", "model.layer=-2", "at least 0"),
    ("model.start_layer=-1", "model.start_layer=-1", "at least 0"),
    ("model.end_layer=0", "model.end_layer=0", "at least 1"),
    ("model.hidden_size=0", "model.hidden_size=0", "at least 1"),
    ("model.language_model_path=", "model.language_model_path=''", "is empty"),
    ("harvest.layers=5:2", "harvest.layers='5:2'", "0 <= a < b"),
    ("harvest.layers=abc", "harvest.layers='abc'", "use all, a list of blocks"),
    ("harvest.layers=[-1]", "harvest.layers=[-1]", "numbered from 0"),
    ("harvest.layers=[]", "harvest.layers=[]", "names no block"),
    ("harvest.layers=-1:", "harvest.layers='-1:'", "0 <= a < b"),
    ("harvest.output=", "harvest.output=''", "is empty"),
    ("harvest.device=", "harvest.device=''", "is empty"),
    ("harvest.zarr_compression=zstd", "harvest.zarr_compression=zstd", "harvest.backend=zarr only"),
    ("training.cache=", "training.cache=''", "is empty"),
    ("training.output_dir=", "training.output_dir=''", "is empty"),
    ("training.run_name=..", "training.run_name='..'", "plain folder name"),
    ("training.run_name=a/b", "training.run_name='a/b'", "plain folder name"),
    ("training.run_name=", "training.run_name=''", "plain folder name"),
    ("data.train_path=", "data.train_path=''", "is empty"),
    ("wandb.project=", "wandb.project=''", "is empty"),
    ("evaluate.run=", "evaluate.run=''", "is empty"),
    ("evaluate.dense_threshold=-3", "evaluate.dense_threshold=-3.0", "in [0, 1]"),
    ("evaluate.dense_threshold=nan", "evaluate.dense_threshold=nan", "in [0, 1]"),
    ("evaluate.dashboard_features=-1", "evaluate.dashboard_features=-1", "at least 0"),
    # the SAE's own settings (sae.config) name their key in the model section too
    ("model.k=0", "model.k=0", "1..latent_size"),
    ("model.threshold=nan", "model.threshold ", "finite number"),
    ("model.threshold_momentum=1", "model.threshold_momentum=1.0", "[0, 1)"),
])
def test_every_section_refuses_a_bad_value_naming_key_value_and_what_is_allowed(override, start, allowed):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert message.startswith(start), message
    assert allowed in message and "\n" not in message


def test_a_routed_range_must_not_be_empty():
    with pytest.raises(ConfigError, match=r"^model.start_layer=3 must be below model.end_layer=3"):
        load_config(None, ["model.start_layer=3", "model.end_layer=3"])
    cfg = load_config(None, ["model.start_layer=2", "model.end_layer=3"])
    assert (cfg.model.start_layer, cfg.model.end_layer) == (2, 3)


@pytest.mark.parametrize("spec, parsed", [
    ("all", "all"), ("2:5", "2:5"), (":3", ":3"), ("2:", "2:"), ("3", "3"), ("1,4,7", "1,4,7"), ("[0, 2]", [0, 2]),
])
def test_every_documented_layer_spec_still_loads(spec, parsed):
    assert load_config(None, [f"harvest.layers={spec}"]).harvest.layers == parsed


def test_a_yaml_file_with_a_bad_evaluate_value_is_refused_naming_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("evaluate:\n  dense_threshold: -3\n")
    with pytest.raises(ConfigError, match=r"^evaluate.dense_threshold=-3.0 must be a number in \[0, 1\]$"):
        load_config(path)
