"""Evaluating a sweep: one command evaluates every member, then the table and the FVU-L0 frontier plot."""

import json
from pathlib import Path

from evaluate.__main__ import main
from evaluate.plots import pareto_front
from evaluate.sweep import series_labels
from tests.train.cache_fixtures import write_cache
from train.sweep.run import run_sweep
from train.sweep.spec import load_sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_pareto_front_keeps_the_points_nothing_beats():
    pts = [(4, 0.5), (8, 0.3), (8, 0.35), (16, 0.4), (16, 0.2), (32, 0.25), (2, 0.9)]
    # By hand: sorted by L0, keep a point when its FVU is below every point of lower (or equal) L0.
    assert pareto_front(pts) == [(2, 0.9), (4, 0.5), (8, 0.3), (16, 0.2)]


def test_series_are_the_varied_keys_other_than_sparsity():
    labels = series_labels({"a": {"model.k": 4, "training.lr": 0.001}, "b": {"model.k": 8, "training.lr": 0.002},
                            "c": {"training.l1_coefficient": 0.5, "model.layer": 2}})
    assert labels == {"a": "lr=0.001", "b": "lr=0.002", "c": "layer=2"}


def test_one_command_evaluates_every_member_and_compares_them(tmp_path, capsys):
    c = write_cache(tmp_path / "cache", content="sparse", n_train=1024, n_heldout=128, layers=(0, 1), d_model=8,
                    shard_rows=256)
    base = tmp_path / "base.yaml"
    base.write_text(f"training:\n  cache: {c.path}\n  batch_size: 128\n  steps: 12\n  log_every: 4\n"
                    f"  output_dir: {tmp_path / 'runs'}\n  shuffle_buffer_rows: 256\n"
                    "evaluate:\n  dashboard_features: 3\n  dashboard_contexts: 2\n  batch_size: 64\n")
    path = tmp_path / "sw.yaml"
    path.write_text(f"base:\n  preset: topk\n  config: {base}\n  overrides: {{model.latent_size: 32, model.layer: 1}}\n"
                    "grid:\n  model.k: [2, 4]\n  training.lr: [1.0e-3, 3.0e-3]\n")
    sweep = load_sweep(path)
    run_sweep(sweep, say=lambda msg: None)
    capsys.readouterr()
    assert main([str(sweep.output_dir), "--no-downstream"]) == 0
    out = capsys.readouterr().out
    names = [m.name for m in sweep.members]
    for name in names:
        ev = json.loads((sweep.output_dir / name / "eval.json").read_text())
        assert ev["run"] == name and ev["sae"]["k"] == int(name.split("-")[0][1:])
        assert name in out
    table = (sweep.output_dir / "_compare" / "compare.md").read_text()
    assert sum(line.startswith("| k") for line in table.splitlines()) == 4
    assert (sweep.output_dir / "_compare" / "fvu_vs_l0.png").read_bytes()[:8] == PNG_MAGIC
    # `evaluate compare runs/<sweep>/*` reads the same members (the summary file and _compare are skipped).
    everything = [str(p) for p in Path(sweep.output_dir).iterdir()]
    assert main(["compare", *everything, "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "compare.md").read_text().count("| k") == 4
