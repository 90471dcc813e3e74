"""Every JSON file a tiny harvest-to-evaluation run writes is strict JSON (issue 17): no bare NaN or
Infinity tokens, which strict parsers (JavaScript's JSON.parse) reject. The run is made to hit a
metric that cannot be computed: a one-row held-out budget has zero total variance, so FVU is 0/0."""

import json
import math
from pathlib import Path

from cache_fixtures import write_cache
from run_fixtures import TINY, tiny_config

from evaluate.compare import compare
from evaluate.run import evaluate_run
from train.run import train


def _refuse_constant(name: str) -> float:
    raise ValueError(f"non-strict JSON constant {name}")


def strict_load(text: str) -> object:
    """json.loads that refuses NaN, Infinity and -Infinity (Python's parser accepts them by default)."""
    return json.loads(text, parse_constant=_refuse_constant)


def _documents(root: Path) -> dict[Path, list[object]]:
    docs: dict[Path, list[object]] = {}
    for f in sorted(root.rglob("*.json")):
        docs[f] = [strict_load(f.read_text())]
    for f in sorted(root.rglob("*.jsonl")):
        docs[f] = [strict_load(line) for line in f.read_text().splitlines() if line.strip()]
    return docs


def test_strict_load_refuses_what_python_accepts():
    assert math.isnan(json.loads('{"fvu": NaN}')["fvu"])  # why the test needs its own parser
    for bad in ('{"fvu": NaN}', "[Infinity]", '{"x": -Infinity}'):
        try:
            strict_load(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad} was accepted")


def test_every_json_of_a_tiny_run_is_strict(tmp_path):
    c = write_cache(tmp_path / "cache", **TINY)
    cfg = tiny_config(c.path, tmp_path / "runs", steps=10, checkpoint_every=5, **{"evaluate.max_tokens": 1})
    run_dir = train(cfg).run_dir
    evaluate_run(run_dir, cfg, downstream=False, plots=False, dashboard=False)

    docs = _documents(tmp_path)
    names = {f.name for f in docs}
    # The writers this covers: the cache's manifest, a checkpoint's state, the saved SAE's config,
    # the metrics lines, training's summary and eval.json.
    assert {"manifest.json", "sae.json", "metrics.jsonl", "train_summary.json", "eval.json"} <= names, names
    assert any(f.parent.name.startswith("step-") for f in docs), "no checkpoint metadata was written"

    # The metric that could not be computed is null, with its reason beside it.
    heldout = json.loads((run_dir / "train_summary.json").read_text())["heldout"]
    assert heldout["rows"] == 1
    assert heldout["fvu"] is None and heldout["fvu_reason"].startswith("not computable (nan): the rows have zero")
    metrics = json.loads((run_dir / "eval.json").read_text())["metrics"]
    assert metrics["fvu"] is None and "zero total variance" in metrics["fvu_reason"]
    assert metrics["explained_variance"] is None and metrics["explained_variance_reason"]

    # Readers of eval.json take the null: compare shows it as "-" and leaves the run off the plot.
    text, plot = compare([run_dir], tmp_path / "compare")
    row = text.splitlines()[2]  # header, rule, the one run
    assert row.split(" | ")[5] == "-" and plot is None
