"""Every preset file in configs/sae/ (found by listing the folder, none named here) loads through the
project's config loader, names a registered type, builds its SAE, and trains through the CLI."""

from pathlib import Path

import pytest

import sae as zoo
from sae import SAEConfig, get, registry
from settings.load import load_config
from tests.train.cache_fixtures import write_cache
from tests.train.run_fixtures import TINY, overrides_for
from train.__main__ import config_files, main

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "configs" / "sae").glob("*.yaml"))


def test_presets_are_found_and_cover_every_registered_type():
    covered = {registry.canonical(load_config(*config_files(p.stem, None)).model.type) for p in PRESETS}
    assert covered == {zoo.canonical(n) for n in zoo.names()}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_builds_its_sae(preset):
    files, overrides = config_files(preset.stem, ROOT / "configs" / "default.yaml")  # as `make train MODEL=name`
    cfg = load_config(files, overrides)  # validated at load: types, allowed values, the type's own rules
    cls = get(cfg.model.type)
    layers = list(range(6)) if cls.routed else [3]
    model = cls(SAEConfig.from_settings(cfg.model, hidden_size=384, layers=layers))
    assert model.d_sae == cfg.model.latent_size and model.cfg.layers == layers
    assert cfg.training.lr > 0


@pytest.fixture(scope="module")
def sparse_cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("cache") / "c", content="sparse", **TINY).path


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_trains_through_the_cli(preset, sparse_cache, tmp_path, capsys):
    canonical = registry.canonical(load_config(*config_files(preset.stem, None)).model.type)
    shrink = {**overrides_for(canonical), "training.tokens": None, "training.num_epochs": 1, "training.steps": 8,
              "training.batch_size": 128, "training.shuffle_buffer_rows": 512, "training.log_every": 4}
    fmt = lambda v: "null" if v is None else (f"[{','.join(map(str, v))}]" if isinstance(v, list) else str(v))  # noqa: E731
    argv = ["--model", preset.stem, "--cache", str(sparse_cache), f"training.output_dir={tmp_path}",
            "training.run_name=r", *[f"{k}={fmt(v)}" for k, v in shrink.items()]]
    assert main(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "r" / "sae" / "sae.json").is_file()
