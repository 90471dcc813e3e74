"""A whole run folder: eval.json, the printed table, PNG plots, the CLI and compare."""

import json

import pytest
import torch
from cache_fixtures import write_cache

from evaluate.__main__ import main
from evaluate.run import evaluate_run, format_table
from sae import SAEConfig
from sae.vanilla import VanillaSAE
from settings import load_config, save_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(root, cache_path, name="vanilla-L1", m=16, groups=None):
    run = root / name
    sae = VanillaSAE(SAEConfig(type="VanillaSAE", hidden_size=8, latent_size=m, k=4, layers=[1], group_sizes=groups))
    with torch.no_grad():
        sae.b_enc.fill_(-0.1)
    sae.save(run / "sae", meta={"cache": str(cache_path), "layers": [1]})
    cfg = load_config(None, [f"training.cache={cache_path}", "evaluate.dashboard_features=5",
                             "evaluate.dashboard_contexts=3", "evaluate.batch_size=64"])
    save_config(cfg, run / "config.yaml")
    with open(run / "metrics.jsonl", "w") as fh:
        for step in range(1, 6):
            fh.write(json.dumps({"step": step, "tokens": 64 * step, "loss": 1 / step, "fvu": 0.5 / step,
                                 "l0": 10 - step, "dead_fraction": 0.01 * step}) + "\n")
        fh.write('{"step": 6, "tok')  # torn last line: skipped
    return run, cfg


@pytest.fixture(scope="module")
def run_and_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    c = write_cache(root / "cache", content="sparse", n_train=128, n_heldout=200, layers=(0, 1), d_model=8,
                    shard_rows=64, noise=0.05)
    return root, c


def test_evaluate_run_writes_eval_json_plots_and_dashboard(run_and_cache):
    root, c = run_and_cache
    run, cfg = make_run(root, c.path, groups=[4, 12])
    result = evaluate_run(run, cfg, downstream=False)
    on_disk = json.loads((run / "eval.json").read_text())
    assert on_disk["metrics"]["tokens"] == 200
    assert on_disk["metrics"]["fvu"] == pytest.approx(result["metrics"]["fvu"])
    assert [g["prefix"] for g in on_disk["matryoshka"]] == [4, 16]
    for name in ("training_curves.png", "feature_density.png"):
        data = (run / "plots" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    page = (run / "dashboard.html").read_text()
    assert page.count('<section class="feature"') == min(5, 16 - on_disk["metrics"]["dead"])
    table = format_table(result)
    assert "| FVU |" in table and "| L0 |" in table and "prefix 4" in table


def test_cli_evaluate_and_compare(run_and_cache, capsys):
    root, c = run_and_cache
    run_a, _ = make_run(root, c.path, name="a")
    run_b, _ = make_run(root, c.path, name="b", m=32)
    assert main([str(run_a), "--no-downstream", f"training.cache={c.path}"]) == 0
    assert main([str(run_b), "--no-downstream"]) == 0
    out = capsys.readouterr().out
    assert "explained variance" in out and "eval.json" in out
    assert main(["compare", str(run_a), str(run_b), "--out", str(root / "_cmp")]) == 0
    md = (root / "_cmp" / "compare.md").read_text()
    assert md.count("| VanillaSAE |") == 2
    assert (root / "_cmp" / "fvu_vs_l0.png").read_bytes().startswith(PNG_MAGIC)


def test_cli_missing_run_is_a_clear_error(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "not a finished training run" in capsys.readouterr().err
