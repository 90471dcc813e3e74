"""`python -m train`: every registered architecture end to end, and every bad input as a clear error."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import train.run as run_mod
from sae import load_sae
from settings import load_config
from tests.train.cache_fixtures import write_cache
from tests.train.run_fixtures import TINY, alias_of, canonical_types, overrides_for
from train.__main__ import build_config, main, parse_args
from train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sparse_cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("cache") / "c", content="sparse", **TINY).path


@pytest.fixture()
def base(tmp_path):
    """A tiny base config, standing in for configs/default.yaml."""
    path = tmp_path / "base.yaml"
    path.write_text(
        "training:\n  batch_size: 128\n  steps: 40\n  log_every: 10\n  checkpoint_every: 20\n"
        f"  output_dir: {tmp_path / 'runs'}\n  shuffle_buffer_rows: 512\n"
    )
    return path


def _args(base, cache, model, *extra):
    return ["--model", model, "--config", str(base), "--cache", str(cache), "training.run_name=r", *extra]


def _run(capsys, argv):
    code = main(argv)
    return code, capsys.readouterr().err


def _tiny(canonical):
    """Command-line overrides that shrink any preset to the tiny cache."""
    over = {**overrides_for(canonical), "training.tokens": None, "training.batch_size": 128, "training.steps": 40,
            "training.lr": 3e-3}
    fmt = lambda v: "null" if v is None else (f"[{','.join(map(str, v))}]" if isinstance(v, list) else str(v))  # noqa: E731
    return [f"{k}={fmt(v)}" for k, v in over.items()]


@pytest.mark.parametrize("canonical", canonical_types())
def test_every_registered_architecture_trains_end_to_end(sparse_cache, base, tmp_path, capsys, canonical):
    code, err = _run(capsys, _args(base, sparse_cache, alias_of(canonical), *_tiny(canonical)))
    assert code == 0, err
    run_dir = tmp_path / "runs" / "r"
    model, meta = load_sae(run_dir / "sae")
    assert type(model).type_name == canonical
    assert meta["cache"] == str(sparse_cache) and meta["layers"]
    assert meta["cache_identity"] == json.loads((sparse_cache / "manifest.json").read_text())["identity"]
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["steps"] == 40 and summary["heldout"]["rows"] == TINY["n_heldout"]
    assert math.isfinite(summary["heldout"]["fvu"]) and summary["heldout"]["l0"] > 0
    rows = read_metrics(run_dir)
    assert rows[-1]["fvu"] < rows[0]["fvu"], rows  # it learns
    resolved = load_config(run_dir / "config.yaml")  # the saved config is a valid config on its own
    assert resolved.training.steps == 40 and resolved.model.hidden_size == TINY["d_model"]


def test_python_dash_m_train_runs_as_a_module(sparse_cache, base, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    tiny = ["training.steps=10", "training.batch_size=128", "model.latent_size=64", "model.k=4"]
    argv = [sys.executable, "-m", "train", *_args(base, sparse_cache, "topk", *tiny)]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "runs" / "r" / "sae" / "sae.safetensors").is_file()
    assert "steps of 128 tokens" in proc.stderr


def test_unknown_model_lists_the_valid_ones(sparse_cache, base, capsys):
    code, err = _run(capsys, _args(base, sparse_cache, "resnet"))
    assert code == 2
    assert "unknown MODEL 'resnet'" in err
    for name in ("vanilla", "gated", "jumprelu"):
        assert name in err


def test_missing_cache_is_a_clear_error(base, tmp_path, capsys):
    code, err = _run(capsys, _args(base, tmp_path / "nowhere", "vanilla"))
    assert code == 1
    assert "nowhere" in err and "make harvest" in err
    assert "Traceback" not in err


def test_incomplete_cache_is_a_clear_error(base, tmp_path, capsys):
    c = write_cache(tmp_path / "half", content="sparse", complete=False, **TINY).path
    code, err = _run(capsys, _args(base, c, "vanilla"))
    assert code == 1 and "incomplete" in err and "make harvest" in err
    assert not (tmp_path / "runs" / "r").exists()


def test_a_layer_the_cache_does_not_hold(sparse_cache, base, capsys):
    code, err = _run(capsys, _args(base, sparse_cache, "vanilla", "model.layer=7"))
    assert code == 1 and "model.layer=7" in err and "[0, 1, 2]" in err


def test_a_routed_range_outside_the_cache(sparse_cache, base, capsys):
    code, err = _run(capsys, _args(base, sparse_cache, "route", "model.start_layer=1", "model.end_layer=5"))
    assert code == 1 and "[3, 4]" in err and "1:5" in err


def test_a_d_in_that_does_not_match_the_cache(sparse_cache, base, capsys):
    code, err = _run(capsys, _args(base, sparse_cache, "vanilla", "model.hidden_size=32"))
    assert code == 1 and "model.hidden_size=32" in err and "d_model=16" in err


def test_bad_override_and_existing_run(sparse_cache, base, tmp_path, capsys):
    code, err = _run(capsys, _args(base, sparse_cache, "vanilla", "training.lrr=1"))
    assert code == 2 and "did you mean training.lr" in err
    assert _run(capsys, _args(base, sparse_cache, "vanilla", "training.steps=5"))[0] == 0
    code, err = _run(capsys, _args(base, sparse_cache, "vanilla", "training.steps=5"))
    assert code == 1 and "--resume" in err and "--overwrite" in err
    assert _run(capsys, _args(base, sparse_cache, "vanilla", "training.steps=5", "--overwrite"))[0] == 0


def test_nan_exits_nonzero_with_the_step(sparse_cache, base, capsys, monkeypatch):
    from tests.train.test_loop import _PoisonedLoader

    monkeypatch.setattr(run_mod, "ActivationLoader", _PoisonedLoader)
    code, err = _run(capsys, _args(base, sparse_cache, "vanilla"))
    assert code == 1 and "step 23" in err and "python -m cache verify" in err


def test_overrides_may_come_between_options():
    from train.__main__ import parse_args

    args = parse_args(["--model", "gated", "training.lr=1e-3", "--config", "configs/default.yaml", "model.k=8"])
    assert args.model == "gated" and str(args.config) == "configs/default.yaml"
    assert args.overrides == ["training.lr=1e-3", "model.k=8"]


def test_the_config_file_wins_over_the_preset_and_model_picks_the_type(tmp_path):
    user = tmp_path / "user.yaml"
    user.write_text("model:\n  type: topk\n  latent_size: 65536\n  k: 64\ntraining:\n  lr: 2.0e-4\n")
    cfg = build_config(parse_args(["--model", "gated", "--config", str(user)]))
    assert cfg.model.type == "gated"  # MODEL, not the file's type
    assert (cfg.model.latent_size, cfg.model.k, cfg.training.lr) == (65536, 64, 2e-4)  # the file's keys
    assert cfg.training.betas == [0.0, 0.999] and cfg.training.l1_coefficient == 0.7  # the preset's others
    default = build_config(parse_args(["--model", "gated", "--config", str(ROOT / "configs" / "default.yaml")]))
    assert (default.model.latent_size, default.training.lr) == (3072, 1e-3)  # the default sets no SAE key
