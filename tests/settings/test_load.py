import pytest

from settings import ConfigError, load_config, save_config
from settings.load import parse_yaml


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_later_files_and_overrides_win(tmp_path):
    a = write(tmp_path, "a.yaml", "training:\n  lr: 1.0e-3\n  batch_size: 1024\nmodel:\n  k: 16\n")
    b = write(tmp_path, "b.yaml", "training:\n  lr: 5.0e-4\n")
    cfg = load_config([a, b], ["model.k=64"])
    assert cfg.training.lr == 5e-4
    assert cfg.training.batch_size == 1024  # kept from a.yaml: sections merge, not replace
    assert cfg.model.k == 64


def test_unknown_key_suggests_the_close_one(tmp_path):
    with pytest.raises(ConfigError, match=r"training\.lrr.*did you mean training\.lr\?"):
        load_config(None, ["training.lrr=1e-4"])
    p = write(tmp_path, "c.yaml", "trainig:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="did you mean training"):
        load_config(p)


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(ConfigError, match=r"training\.lr must be float, got 'fast'"):
        load_config(None, ["training.lr=fast"])
    with pytest.raises(ConfigError, match=r"training\.steps must be int or null"):
        load_config(None, ["training.steps=1.5"])
    with pytest.raises(ConfigError, match=r"model\.group_sizes"):
        load_config(None, ["model.group_sizes=[1, x]"])


def test_yaml_surprises_are_avoided():
    # YAML 1.1 reads 6:21 as the base-60 integer 381 and 1e-4 as a string.
    assert parse_yaml("a: 6:21\nb: 1e-4\nc: 7") == {"a": "6:21", "b": 1e-4, "c": 7}
    cfg = load_config(None, ["harvest.layers=6:21", "training.lr=1e-4", "harvest.layers=6:21"])
    assert cfg.harvest.layers == "6:21" and cfg.training.lr == 1e-4
    assert load_config(None, ["harvest.layers=[0, 2]"]).harvest.layers == [0, 2]


def test_null_and_int_to_float():
    cfg = load_config(None, ["training.steps=null", "training.lr=1", "training.gradient_clip_norm=none"])
    assert cfg.training.steps is None and cfg.training.lr == 1.0 and isinstance(cfg.training.lr, float)
    assert cfg.training.gradient_clip_norm is None


def test_override_needs_section_and_equals():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["training.lr"])
    with pytest.raises(ConfigError, match="section"):
        load_config(None, ["lr=1"])


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(None, ["training.lr=3e-4", "model.latent_size=256", "model.group_sizes=[64, 192]",
                             "harvest.layers=1:3"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_shipped_configs_are_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    files = sorted(root.glob("*.yaml"))
    assert files, "configs/*.yaml missing"
    for f in files:
        load_config(f)


@pytest.mark.parametrize("override,message", [
    ("model.routing=sof", r"model\.routing must be one of hard, soft, got 'sof'; did you mean soft\?"),
    ("model.type=topkk", r"unknown SAE type 'topkk'; valid: .*batchtopk"),
    ("model.group_sizes=[8,8]", r"group_sizes \[8, 8\] sum to 16, but latent_size is 3072"),
    ("harvest.backend=parquet", r"harvest\.backend must be one of safetensors, zarr"),
    ("training.dtype=fp16", r"training\.dtype must be one of auto, float32, bfloat16, float64"),
])
def test_allowed_values_are_checked_when_the_config_is_loaded(override, message):
    # Before any stage runs: `make harvest model.routing=sof` used to pass.
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_an_architectures_own_rules_are_checked_at_load():
    with pytest.raises(ConfigError, match="needs model.group_sizes"):
        load_config(None, ["model.type=matryoshka"])
    with pytest.raises(ConfigError, match="JumpReLU needs threshold >= 0"):
        load_config(None, ["model.type=jumprelu", "model.threshold=-1"])


def test_literal_choices_agree_with_their_owners():
    import typing

    from cache.encoding import ENCODED_DTYPES
    from cache.names import BACKENDS, STORED_DTYPES, ZARR_COMPRESSIONS
    from settings import HarvestConfig, TrainingConfig
    from train.precision import TRAINING_DTYPES
    from train.schedule import LR_SCHEDULES

    hints, thints = typing.get_type_hints(HarvestConfig), typing.get_type_hints(TrainingConfig)
    assert typing.get_args(hints["backend"]) == BACKENDS
    assert typing.get_args(typing.get_args(hints["zarr_compression"])[0]) == ZARR_COMPRESSIONS
    assert set(typing.get_args(hints["store_dtype"])) == {"auto", *STORED_DTYPES, *ENCODED_DTYPES}
    assert set(typing.get_args(hints["dtype"])) == {"auto", *STORED_DTYPES}  # the model's compute dtype
    assert typing.get_args(thints["lr_schedule"]) == LR_SCHEDULES
    assert typing.get_args(thints["dtype"]) == TRAINING_DTYPES


@pytest.mark.parametrize("module,keys", [
    ("train", ["model.routing", "training.lr_schedule", "wandb.use_wandb"]),
    ("harvest", ["model.language_model_path", "data.train_path", "harvest.shard_rows"]),
    ("evaluate", ["evaluate.max_tokens"]),
    ("settings", ["model.k", "harvest.backend", "evaluate.dense_threshold"]),
])
def test_each_cli_help_lists_the_keys_with_their_comments(module, keys, capsys):
    import importlib

    main = importlib.import_module(f"{module}.__main__").main
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for key in keys:
        assert f"  {key}: " in out, key
    # the comment written beside the field in its one description
    if module in ("train", "settings"):
        assert "model.routing: one of hard, soft = hard  # Route*: one layer per token (argmax) or a softmax mix" in out
