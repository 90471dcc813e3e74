"""PNG plots (matplotlib, Agg backend: no display needed): training curves, feature density,
RouteSAE layer usage, and the FVU-L0 frontier across runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

import durable  # noqa: E402
from evaluate.labels import dense_threshold, heldout_title, percent  # noqa: E402
from sae.measure import ROUTING_KEY  # noqa: E402
from train.layout import METRICS_FILE, PLOTS_DIR  # noqa: E402

CURVES = (("loss", "loss"), ("fvu", "FVU (batch)"), ("l0", "L0"), ("dead_fraction", "dead fraction"))


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl -> records; a torn last line (a run killed mid-write) is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def training_curves(records: list[dict], out: Path) -> Path | None:
    """Loss, FVU, L0 and dead fraction against training tokens (2x2 panels)."""
    if not records:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, label) in zip(axes.flat, CURVES, strict=True):
        pts = [(r["tokens"], r[key]) for r in records if isinstance(r.get(key), int | float) and "tokens" in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), lw=1.2)
        ax.set_title(label)
        ax.set_xlabel("training tokens")
        ax.grid(alpha=0.3)
        if key in ("loss", "fvu") and pts and min(p[1] for p in pts) > 0:
            ax.set_yscale("log")
    fig.tight_layout()
    return _save(fig, out)


def density_plot(hist: dict, out: Path, title: str = "feature density (held-out)",
                 dense_threshold: float | None = None, dense: int | None = None) -> Path:
    """Histogram of log10 firing frequency of the latents that fire; the dead count in the title, and
    the dense threshold the evaluation used as a line (with the count of latents above it)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    edges, counts = hist.get("edges", []), hist.get("counts", [])
    if counts:
        ax.stairs(counts, edges, fill=True, alpha=0.7)
    heading = f"{title}; dead: {hist.get('dead', 0)}"
    if dense_threshold is not None and dense_threshold > 0:
        label = f"dense: >{percent(dense_threshold)} of tokens"
        ax.axvline(math.log10(dense_threshold), color="tab:red", ls="--", lw=1, label=label)
        ax.legend(loc="upper left")
        if dense is not None:
            heading += f"; dense (>{percent(dense_threshold)}): {dense}"
    ax.set_xlabel("log10(share of tokens on which the latent fires)")
    ax.set_ylabel("latents")
    ax.set_title(heading)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out)


def layer_usage_plot(route: dict, out: Path) -> Path:
    """RouteSAE: share of routed tokens per block, with each block's FVU on its own tokens."""
    fig, ax = plt.subplots(figsize=(7, 4))
    rows = route["per_layer"]
    ax.bar([str(r["layer"]) for r in rows], [r["share"] for r in rows])
    ax.set_xlabel("block")
    ax.set_ylabel("share of routed tokens")
    ax.set_title("RouteSAE layer usage (held-out)")
    for i, r in enumerate(rows):
        if "fvu" in r:
            ax.annotate(f"FVU {r['fvu']:.2f}", (i, r["share"]), ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    return _save(fig, out)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (L0, FVU) points that no other point beats on both (lower L0 and lower FVU), by L0."""
    front: list[tuple[float, float]] = []
    for l0, fvu in sorted(points):
        if not front or fvu < front[-1][1]:
            front.append((l0, fvu))
    return front


def frontier_plot(rows: list[dict], out: Path, heldout: str = "held-out") -> Path:
    """FVU against L0, one series per architecture (or per `series` label where rows carry one; rows:
    {type, l0, fvu, run}), and the frontier of all the points (dashed). `heldout` labels the axes with
    what was measured (compare: "held-out, 42,608 tokens")."""
    fig, ax = plt.subplots(figsize=(7, 5))
    key = lambda r: r.get("series") or r["type"]  # noqa: E731
    for label in sorted({key(r) for r in rows}):
        pts = sorted((r["l0"], r["fvu"]) for r in rows if key(r) == label)
        ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    front = pareto_front([(r["l0"], r["fvu"]) for r in rows])
    if len(front) > 1:
        ax.plot(*zip(*front, strict=True), ls="--", color="0.4", lw=1, zorder=0, label="frontier")
    ax.set_xlabel(f"L0 ({heldout})")
    ax.set_ylabel(f"FVU ({heldout})")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("FVU against L0 by architecture")
    fig.tight_layout()
    return _save(fig, out)


def write_run_plots(run_dir: Path, result: dict) -> list[Path]:
    """All of one run's plots into `run_dir/plots/`; returns the files written."""
    folder = Path(run_dir) / PLOTS_DIR
    folder.mkdir(exist_ok=True)
    written = [training_curves(read_metrics(Path(run_dir) / METRICS_FILE), folder / "training_curves.png"),
               density_plot(result["density_histogram"], folder / "feature_density.png",
                            title=f"feature density ({heldout_title(result)})", dense_threshold=dense_threshold(result),
                            dense=result.get("metrics", {}).get("dense"))]
    if ROUTING_KEY in result:
        written.append(layer_usage_plot(result[ROUTING_KEY], folder / "layer_usage.png"))
    return [p for p in written if p is not None]


def _save(fig: plt.Figure, out: Path) -> Path:
    try:
        return durable.write_via(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
