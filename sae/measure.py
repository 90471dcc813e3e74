"""One implementation of an SAE's reconstruction and sparsity metrics over a stream of batches: what
training's held-out summary (train/run.py) and stage 3 (evaluate/heldout.py) both report.

The batches are raw activations in order (the caller reads them, e.g. `Cache.iter_rows`); nothing
is held beyond float64 sums (sae.metrics). Units: metrics are computed in the SAE's normalised units
(what `forward` returns); a single-layer SAE also gets `mse_raw` (raw = normalised / input_scale^2).
FVU, explained variance, cosine, l2 ratio and relative bias are unit-free. A routed SAE's target
mixes layers, so it has no raw unit; it gets per-layer routing shares and FVU instead. An SAE with
nested groups (`group_sizes`) gets the metrics of every prefix.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from sae.base import BaseSAE
from sae.metrics import ReconAccumulator, density_histogram

# Names of the optional sections of the result (and so of eval.json), kept from the first SAEs that had them.
PREFIXES_KEY = "matryoshka"  # metrics of each nested prefix of the latents (SAEs with group_sizes)
ROUTING_KEY = "route"  # routing shares and per-layer FVU (routed SAEs)


@torch.no_grad()
def measure(sae: BaseSAE, batches: Iterable[Tensor], *, l1_coefficient: float = 0.0, dense_threshold: float = 0.1,
            device: str | torch.device = "cpu") -> dict[str, Any]:
    """Run `sae` in inference mode over `batches` (raw [B, d], routed [B, n_layers, d]) -> a JSON-ready
    dict: {"metrics": {...}, "loss": {term: mean}, "density_histogram": {...}, "feature_density": [M],
    "matryoshka": [{"prefix": m_i, ...metrics}] (with group_sizes), "route": {...} (routed)}.
    The SAE's training mode is restored afterwards."""
    cfg = sae.cfg
    acc = ReconAccumulator(cfg.hidden_size, cfg.latent_size)
    prefixes = _prefixes(cfg.group_sizes)
    group_accs = [ReconAccumulator(cfg.hidden_size, p) for p in prefixes]
    route = _RouteStats(list(cfg.layers) or list(range(cfg.n_layers))) if sae.routed else None
    loss_sums: dict[str, float] = {}
    dtype = next(sae.parameters()).dtype
    was_training = sae.training
    sae.eval()
    try:
        for x in batches:
            x = x.to(device=device, dtype=dtype)
            out = sae(x)
            acc.update(out["target"], out["sae_out"], out["feature_acts"])
            for name, value in sae.loss(out, l1_coefficient=l1_coefficient).items():
                loss_sums[name] = loss_sums.get(name, 0.0) + float(value) * x.shape[0]
            for p, gacc in zip(prefixes, group_accs, strict=True):
                f = out["feature_acts"].clone()
                f[:, p:] = 0
                gacc.update(out["target"], _normalised_decode(sae, f), f[:, :p])
            if route is not None:
                route.update(out)
    finally:
        sae.train(was_training)
    return _result(sae, acc, loss_sums, prefixes, group_accs, route, dense_threshold)


def _result(sae: BaseSAE, acc: ReconAccumulator, loss_sums: dict[str, float], prefixes: list[int],
            group_accs: list[ReconAccumulator], route: _RouteStats | None, dense_threshold: float) -> dict[str, Any]:
    metrics = acc.result(dense_threshold)
    if route is None:
        metrics["mse_raw"] = metrics["mse"] / float(sae.input_scale[0]) ** 2
    density = acc.density()
    result: dict[str, Any] = {
        "metrics": metrics,
        "loss": {k: v / acc.n for k, v in loss_sums.items()},
        "density_histogram": density_histogram(density),
        "feature_density": [float(d) for d in density],
    }
    if prefixes:
        result[PREFIXES_KEY] = [{"prefix": p, **g.result(dense_threshold)}
                                for p, g in zip(prefixes, group_accs, strict=True)]
    if route is not None:
        result[ROUTING_KEY] = route.result()
    return result


def _prefixes(group_sizes: list[int] | None) -> list[int]:
    if not group_sizes:
        return []
    out, total = [], 0
    for s in group_sizes:
        total += s
        out.append(total)
    return out


def _normalised_decode(sae: BaseSAE, f: Tensor) -> Tensor:
    """Latents [B, M] -> reconstruction [B, d] in normalised units (a single-layer SAE's decode
    returns raw units; a routed one's returns x_route's normalised units already)."""
    if sae.routed:
        return sae.decode(f)
    return sae.decode(f) * sae.input_scale[0].to(f.dtype)


class _RouteStats:
    """Routed SAEs: each routed layer's share of tokens (hard: argmax counts; soft: probability mass)
    and the reconstruction error of the tokens routed to it."""

    def __init__(self, layers: list[int]):
        self.layers = layers
        self.weight = torch.zeros(len(layers), dtype=torch.float64)
        self.accs: list[ReconAccumulator | None] = [None] * len(layers)

    def update(self, out: dict[str, Tensor]) -> None:
        weights = out["layer_weights"].detach().double().cpu()  # [B, n_layers]
        self.weight += weights.sum(dim=0)
        chosen = weights.argmax(dim=1)
        target, recon = out["target"].detach().cpu(), out["sae_out"].detach().cpu()
        for j in range(len(self.layers)):
            sel = chosen == j
            if bool(sel.any()):
                acc = self.accs[j]
                if acc is None:
                    acc = self.accs[j] = ReconAccumulator(target.shape[1])
                acc.update(target[sel], recon[sel])

    def result(self) -> dict[str, Any]:
        share = self.weight / self.weight.sum().clamp_min(1e-12)
        per_layer = []
        for layer, s, acc in zip(self.layers, share.tolist(), self.accs, strict=True):
            row: dict[str, Any] = {"layer": layer, "share": s, "tokens": acc.n if acc else 0}
            if acc is not None:
                r = acc.result()
                row.update({"mse": r["mse"], "fvu": r["fvu"]})
            per_layer.append(row)
        return {"layers": self.layers, "share": share.tolist(), "per_layer": per_layer}
