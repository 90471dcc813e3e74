"""Compare runs: a markdown table of every evaluated run on one cache, and FVU against L0 by
architecture (plot). Reads each run's eval.json; runs not yet evaluated are listed as such."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from evaluate.plots import frontier_plot
from train.layout import EVAL_FILE


def collect(run_dirs: list[Path]) -> tuple[list[dict], list[str]]:
    """-> (rows from eval.json files, notes about runs that could not be used)."""
    rows, notes = [], []
    for run in run_dirs:
        f = Path(run) / EVAL_FILE
        if not f.is_file():
            notes.append(f"{run}: no {EVAL_FILE} (run `make evaluate RUN={run}`)")
            continue
        try:
            ev = json.loads(f.read_text())
            m = ev["metrics"]
            rows.append({"run": ev["run"], "type": ev["sae"]["type"], "layers": ev["sae"]["layers"],
                         "d_sae": ev["sae"]["d_sae"], "cache": ev["cache"], "l0": m["l0"], "fvu": m["fvu"],
                         "dead_fraction": m["dead_fraction"], "downstream": ev.get("downstream", {}),
                         "tokens": m.get("tokens")})
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            notes.append(f"{f}: unreadable ({type(e).__name__}: {e})")
    return rows, notes


def markdown(rows: list[dict]) -> str:
    cols = ["run", "type", "blocks", "d_sae", "L0", "FVU", "dead", "CE loss score", "KL/token", "emb. cos"]
    lines = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    # eval.json records a metric that could not be computed as null (strict JSON): shown as "-", sorted last.
    for r in sorted(rows, key=lambda r: (r["type"], math.inf if r["l0"] is None else r["l0"])):
        d = r["downstream"]
        lines.append(f"| {r['run']} | {r['type']} | {r['layers']} | {r['d_sae']} | {_fmt(r['l0'], '.1f')} | "
                     f"{_fmt(r['fvu'])} | {_fmt(r['dead_fraction'], '.1%')} | {_fmt(d.get('ce_loss_score'))} | "
                     f"{_fmt(d.get('kl_per_token'))} | {_fmt(d.get('embedding_cos_sae'))} |")
    return "\n".join(lines)


def _fmt(v: object, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def compare(run_dirs: Sequence[str | Path], out_dir: str | Path,
            series: dict[str, str] | None = None) -> tuple[str, Path | None]:
    """Markdown table (also written to out_dir/compare.md) and the FVU-L0 plot. Runs on different
    caches are not comparable: refused, naming the caches. `series` (run name -> label) splits an
    architecture's points into series (a sweep's learning rates, say)."""
    rows, notes = collect([Path(r) for r in run_dirs])
    for r in rows:
        label = (series or {}).get(r["run"])
        r["series"] = f"{r['type']} {label}" if label else r["type"]
    caches = sorted({r["cache"] for r in rows})
    if len(caches) > 1:
        raise ValueError(f"these runs were evaluated on different caches {caches}: compare runs of one cache at a time")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(rows) + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else "")
    (out_dir / "compare.md").write_text(text + "\n")
    plotted = [r for r in rows if r["l0"] is not None and r["fvu"] is not None]
    plot = frontier_plot(plotted, out_dir / "fvu_vs_l0.png", heldout_label(plotted)) if plotted else None
    return text, plot


def heldout_label(rows: list[dict]) -> str:
    """The plot's axis note: the held-out size the runs were measured on (a range when they differ)."""
    sizes = sorted({r["tokens"] for r in rows if isinstance(r.get("tokens"), int)})
    if not sizes:
        return "held-out"
    if len(sizes) == 1:
        return f"held-out, {sizes[0]:,} tokens"
    return f"held-out, {sizes[0]:,} to {sizes[-1]:,} tokens (runs measured on different sizes)"
