"""Evaluate every member of a sweep (`make evaluate RUN=runs/<sweep>`, or `python -m evaluate
runs/<sweep>`) and compare them: the table and the FVU-L0 frontier plot in `runs/<sweep>/_compare/`.

A sweep folder is one holding `sweep_summary.json` (train/sweep); its members are its run folders.
In the plot, the keys that set sparsity (model.k, training.l1_coefficient) move a member along its
series; every other key the sweep varies (learning rate, width, layer, ...) makes its own series.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from train.layout import SAE_DIR, SWEEP_SUMMARY_FILE

SPARSITY_KEYS = ("model.k", "training.l1_coefficient")


def is_sweep(folder: str | Path) -> bool:
    return (Path(folder) / SWEEP_SUMMARY_FILE).is_file()


def members(folder: str | Path) -> tuple[list[Path], dict[str, dict[str, Any]]]:
    """(the finished members' run folders, in the sweep's order; each member's variation by name)."""
    folder = Path(folder)
    try:
        summary = json.loads((folder / SWEEP_SUMMARY_FILE).read_text())
        variations = {r["member"]: dict(r.get("variation") or {}) for r in summary["members"]}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{folder / SWEEP_SUMMARY_FILE} is unreadable ({type(e).__name__}: {e})") from e
    runs = [folder / name for name in variations if (folder / name / SAE_DIR / "sae.json").is_file()]
    return runs, variations


def series_labels(variations: dict[str, dict[str, Any]]) -> dict[str, str]:
    """member -> its series in the frontier plot: the varied keys other than the sparsity keys."""
    return {name: ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in var.items() if k not in SPARSITY_KEYS)
            for name, var in variations.items()}


def evaluate_sweep(folder: str | Path, evaluate_one: Callable[[Path], Any], say: Callable[[str], None]
                   ) -> tuple[str, Path | None]:
    """`evaluate_one(run_dir)` for every finished member, then the comparison into folder/_compare."""
    from evaluate.compare import compare

    folder = Path(folder)
    runs, variations = members(folder)
    left_out = [n for n in variations if folder / n not in runs]
    for i, run in enumerate(runs, 1):
        say(f"[{i}/{len(runs)}] evaluating {run}")
        evaluate_one(run)
    for name in left_out:
        say(f"{name}: no saved SAE (it stopped or has not finished; see {folder / SWEEP_SUMMARY_FILE})")
    return compare(list(runs), folder / "_compare", series=series_labels(variations))
