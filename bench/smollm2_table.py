"""The SmolLM2 comparison table (README, bench/RESULTS.md "SmolLM2-135M") from evaluated run folders.

Reads each run's eval.json (written by `python -m evaluate RUN`) and adds one figure the evaluation
does not report for single-layer SAEs: NMSE_tok = mean over held-out tokens of ||x - x_hat||^2 / ||x||^2,
the RouteSAE paper's reconstruction metric (for a routed SAE it is its own training loss on x_route,
read from eval.json). Prints markdown.

    .venv/bin/python bench/smollm2_table.py runs/smollm2-topk runs/smollm2-route
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cache  # noqa: E402
from evaluate.heldout import iter_batches  # noqa: E402
from sae import load_sae  # noqa: E402


@torch.no_grad()
def nmse_tok(run: Path, result: dict) -> float:
    if "nmse" in result["loss"]:  # routed: the training objective, on held-out x_route
        return float(result["loss"]["nmse"])
    sae, _ = load_sae(run / "sae")
    total, n = 0.0, 0
    with cache.open(result["cache"]) as c:
        for x in iter_batches(c, list(sae.cfg.layers), 4096):
            x = x.float()
            err = (x - sae.reconstruct(x)).pow(2).sum(-1) / x.pow(2).sum(-1)
            total, n = total + float(err.sum()), n + x.shape[0]
    return total / n


def row(run: Path) -> dict:
    r = json.loads((run / "eval.json").read_text())
    m, d = r["metrics"], r.get("downstream", {})
    out = {"run": r["run"], "type": r["sae"]["type"], "layers": r["sae"]["layers"], "fvu": m["fvu"], "l0": m["l0"],
           "dead": m["dead_fraction"], "nmse": nmse_tok(run, r), "ce_score": d.get("ce_loss_score"),
           "kl": d.get("kl_per_token"), "ce": (d.get("ce_clean"), d.get("ce_sae"), d.get("ce_zero"))}
    if "route" in r:
        out["shares"] = {row["layer"]: row["share"] for row in r["route"]["per_layer"]}
        out["fvu_by_block"] = {row["layer"]: row.get("fvu") for row in r["route"]["per_layer"]}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    rows = [row(run) for run in p.parse_args().runs]
    print("| SAE | blocks | held-out FVU | NMSE_tok | L0 | dead | CE loss score | KL per token | CE clean / spliced / "
          "zero |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        blocks = f"{r['layers'][0]}..{r['layers'][-1]}" if len(r["layers"]) > 1 else str(r["layers"][0])
        ce = " / ".join(f"{v:.3f}" for v in r["ce"]) if r["ce"][0] is not None else "-"
        print(f"| {r['type']} | {blocks} | {r['fvu']:.4f} | {r['nmse']:.4f} | {r['l0']:.1f} | {r['dead']:.2%} | "
              f"{r['ce_score']:.4f} | {r['kl']:.4f} | {ce} |")
    for r in rows:
        if "shares" in r:
            used = {k: v for k, v in r["shares"].items() if v >= 0.0005}
            print(f"\n{r['run']} routing shares (blocks with >= 0.05%): "
                  + ", ".join(f"{k}: {v:.2%} (FVU {r['fvu_by_block'][k]:.3f})" for k, v in used.items()))


if __name__ == "__main__":
    main()
