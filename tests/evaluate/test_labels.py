"""The evaluate settings a result was measured with are recorded in eval.json, and the table and the
plots label the figures with them (the dense threshold, the held-out size), never with fixed text."""

import json

import pytest

import evaluate.plots as plots
from evaluate.__main__ import main
from evaluate.compare import compare
from evaluate.run import evaluate_run, format_table
from settings import load_config
from tests.evaluate.test_run import make_run
from tests.train.cache_fixtures import write_cache


@pytest.fixture(scope="module")
def run_and_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    c = write_cache(root / "cache", content="sparse", n_train=128, n_heldout=200, layers=(0, 1), d_model=8,
                    shard_rows=64, noise=0.05)
    return root, c


@pytest.fixture
def captured_figures(monkeypatch) -> list:
    """Every figure the plots module saves: (file name, title, legend texts, x label)."""
    seen: list = []
    real_save = plots._save

    def save(fig, out):
        ax = fig.axes[0]
        legend = ax.get_legend()
        seen.append((out.name, ax.get_title(), [t.get_text() for t in legend.get_texts()] if legend else [],
                     ax.get_xlabel()))
        return real_save(fig, out)

    monkeypatch.setattr(plots, "_save", save)
    return seen


def test_eval_json_records_the_settings_and_the_table_and_plot_use_them(run_and_cache, captured_figures):
    root, c = run_and_cache
    run, _ = make_run(root, c.path, name="thresholds")
    cfg = load_config([run / "config.yaml"], ["evaluate.dense_threshold=0.45", "evaluate.max_tokens=100"])
    result = evaluate_run(run, cfg, downstream=False)
    on_disk = json.loads((run / "eval.json").read_text())
    assert on_disk["evaluate"] == {"dense_threshold": 0.45, "max_tokens": 100, "heldout_rows": 200}
    assert on_disk["metrics"]["tokens"] == 100
    # the threshold recorded is the one applied: the dense count is the latents above 45%, not 10%
    density = on_disk["feature_density"]
    assert on_disk["metrics"]["dense"] == sum(d > 0.45 for d in density)
    assert sum(d > 0.45 for d in density) != sum(d > 0.1 for d in density)  # the case tells them apart
    table = format_table(result)
    assert "| dense latents (firing on >45% of tokens) |" in table
    assert "10%" not in table
    assert "| held-out tokens (the first 100 of 200: evaluate.max_tokens) | 100 |" in table
    (density_fig,) = [f for f in captured_figures if f[0] == "feature_density.png"]
    _, title, legend, _ = density_fig
    assert "held-out, 100 tokens" in title and f"dense (>45%): {on_disk['metrics']['dense']}" in title
    assert legend == ["dense: >45% of tokens"]
    # the dashboard searches the whole split for contexts, and says its densities are of the tokens measured
    page = (run / "dashboard.html").read_text()
    assert "top activations over 200 held-out tokens; firing densities over the first 100 of them." in page


def test_small_thresholds_are_not_rounded_away(run_and_cache):
    root, c = run_and_cache
    run, _ = make_run(root, c.path, name="small-threshold")
    cfg = load_config([run / "config.yaml"], ["evaluate.dense_threshold=0.005"])
    table = format_table(evaluate_run(run, cfg, downstream=False, plots=False, dashboard=False))
    assert "| dense latents (firing on >0.5% of tokens) |" in table
    assert "| held-out tokens | 200 |" in table  # the whole split: no "first N of" note


def test_an_older_eval_json_without_settings_claims_no_threshold():
    result = {"run": "old", "sae": {"type": "TopKSAE", "layers": [1], "d_sae": 8},
              "metrics": {"tokens": 10, "dense_fraction": 0.5}}
    table = format_table(result)
    assert "| dense latents | 50.00% |" in table


def test_compare_plot_names_the_heldout_size(run_and_cache, captured_figures):
    root, c = run_and_cache
    runs = []
    for name, tokens in (("cmp-a", 100), ("cmp-b", 200)):
        run, _ = make_run(root, c.path, name=name)
        evaluate_run(run, load_config([run / "config.yaml"], [f"evaluate.max_tokens={tokens}"]), downstream=False,
                     plots=False, dashboard=False)
        runs.append(run)
    compare(runs[:1], root / "_cmp1")
    compare(runs, root / "_cmp2")
    xlabels = [f[3] for f in captured_figures if f[0] == "fvu_vs_l0.png"]
    assert xlabels == ["L0 (held-out, 100 tokens)",
                       "L0 (held-out, 100 to 200 tokens (runs measured on different sizes))"]


@pytest.mark.parametrize(("override", "message"), [
    ("evaluate.dense_threshold=-3", "evaluate.dense_threshold=-3.0 must be a number in [0, 1]"),
    ("evaluate.batch_size=0", "evaluate.batch_size=0 must be at least 1"),
])
def test_cli_refuses_bad_evaluate_settings_naming_the_key(run_and_cache, capsys, override, message):
    root, c = run_and_cache
    run, _ = make_run(root, c.path, name="bad-settings")
    assert main([str(run), "--no-downstream", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {message}" and "\n" not in err
    assert not (run / "eval.json").exists()
