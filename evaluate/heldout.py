"""Stream the cache's held-out split through an SAE and accumulate metrics (evaluate.metrics), one
batch at a time, so the split is never held in memory.

Units: metrics are computed in the SAE's normalised units (what `forward` returns); for a
single-layer SAE `mse_raw` is also reported (raw = normalised / input_scale^2). FVU, explained
variance, cosine, l2 ratio and relative bias are unit-free. A routed SAE's target mixes layers,
so it has no raw unit.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from evaluate.metrics import ReconAccumulator, density_histogram

SPLIT = "heldout"


def sae_layers(sae: torch.nn.Module) -> list[int]:
    """The cache blocks the SAE reads (recorded in its config at training time)."""
    layers = list(sae.cfg.layers)
    if not layers:
        raise ValueError("the SAE's config names no cache layers (sae.json config.layers is empty); "
                         "it cannot be matched to the cache: retrain it, or set config.layers in sae.json")
    return layers


def iter_batches(cache: object, layers: list[int], batch_size: int, max_tokens: int | None = None,
                 split: str = SPLIT) -> Iterator[Tensor]:
    """Held-out activations in order: [B, d] for one layer, [B, n_layers, d] for several."""
    missing = [layer for layer in layers if layer not in cache.layers]
    if missing:
        raise ValueError(f"the SAE reads block(s) {missing}, but the cache at {cache.path} holds {cache.layers}")
    which: int | list[int] = layers[0] if len(layers) == 1 else layers
    budget = max_tokens if max_tokens is not None else cache.num_rows(split)
    for info in cache.shards(split):
        for start in range(0, info.rows, batch_size):
            if budget <= 0:
                return
            stop = min(start + batch_size, info.rows, start + budget)
            budget -= stop - start
            yield cache.read(split, info.index, which, start, stop)


@torch.no_grad()
def heldout_metrics(sae: torch.nn.Module, cache: object, *, batch_size: int = 4096, max_tokens: int | None = None,
                    l1_coefficient: float = 0.0, dense_threshold: float = 0.1,
                    device: str | torch.device = "cpu") -> dict:
    """Every held-out metric for `sae` on `cache` -> a JSON-ready dict:
    {"metrics": {...}, "loss": {term: mean}, "density_histogram": {...}, "feature_density": [M],
     "matryoshka": [{"prefix": m_i, ...metrics}] (if grouped), "route": {...} (if routed)}."""
    sae.eval()
    layers = sae_layers(sae)
    cfg = sae.cfg
    acc = ReconAccumulator(cfg.hidden_size, cfg.latent_size)
    prefixes = _prefixes(cfg.group_sizes)
    group_accs = [ReconAccumulator(cfg.hidden_size, p) for p in prefixes]
    route = _RouteStats(layers) if len(layers) > 1 else None
    loss_sums: dict[str, float] = {}
    dtype = next(sae.parameters()).dtype
    for x in iter_batches(cache, layers, batch_size, max_tokens):
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
    metrics = acc.result(dense_threshold)
    if route is None:
        scale = float(sae.input_scale[0])
        metrics["mse_raw"] = metrics["mse"] / scale**2
    density = acc.density()
    result = {
        "metrics": metrics,
        "loss": {k: v / acc.n for k, v in loss_sums.items()},
        "density_histogram": density_histogram(density),
        "feature_density": [float(d) for d in density],
    }
    if prefixes:
        result["matryoshka"] = [{"prefix": p, **g.result(dense_threshold)} for p, g in zip(prefixes, group_accs,
                                                                                          strict=True)]
    if route is not None:
        result["route"] = route.result()
    return result


def _prefixes(group_sizes: list[int] | None) -> list[int]:
    if not group_sizes:
        return []
    out, total = [], 0
    for s in group_sizes:
        total += s
        out.append(total)
    return out


def _normalised_decode(sae: torch.nn.Module, f: Tensor) -> Tensor:
    """Latents [B, M] -> reconstruction [B, d] in normalised units (a single-layer SAE's decode
    returns raw units; a routed one's returns x_route's normalised units already)."""
    if sae.cfg.n_layers > 1:
        return sae.decode(f)
    return sae.decode(f) * sae.input_scale[0].to(f.dtype)


class _RouteStats:
    """RouteSAE: each routed layer's share of tokens (hard: argmax counts; soft: probability mass)
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
                if self.accs[j] is None:
                    self.accs[j] = ReconAccumulator(target.shape[1])
                self.accs[j].update(target[sel], recon[sel])

    def result(self) -> dict:
        share = self.weight / self.weight.sum().clamp_min(1e-12)
        per_layer = []
        for layer, s, acc in zip(self.layers, share.tolist(), self.accs, strict=True):
            row = {"layer": layer, "share": s, "tokens": acc.n if acc else 0}
            if acc is not None:
                r = acc.result()
                row.update({"mse": r["mse"], "fvu": r["fvu"]})
            per_layer.append(row)
        return {"layers": self.layers, "share": share.tolist(), "per_layer": per_layer}
