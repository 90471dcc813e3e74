"""The cache's held-out split through an SAE: the metrics are sae.measure's (the same implementation
training's summary reports), over `Cache.iter_rows` of the split, one batch at a time, so the split
is never held in memory."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from cache import Cache
from cache.names import HELDOUT
from sae import BaseSAE
from sae.measure import measure

SPLIT = HELDOUT


def sae_layers(sae: BaseSAE) -> list[int]:
    """The cache blocks the SAE reads (recorded in its config at training time)."""
    layers = list(sae.cfg.layers)
    if not layers:
        raise ValueError("the SAE's config names no cache layers (sae.json config.layers is empty); "
                         "it cannot be matched to the cache: retrain it, or set config.layers in sae.json")
    return layers


def iter_batches(cache: Cache, layers: list[int], batch_size: int, max_tokens: int | None = None,
                 split: str = SPLIT) -> Iterator[Tensor]:
    """Held-out activations in order: [B, d] for one layer, [B, n_layers, d] for several."""
    missing = [layer for layer in layers if layer not in cache.layers]
    if missing:
        raise ValueError(f"the SAE reads block(s) {missing}, but the cache at {cache.path} holds {cache.layers}")
    return cache.iter_rows(split, layers[0] if len(layers) == 1 else layers, batch_size, max_tokens)


def heldout_metrics(sae: BaseSAE, cache: Cache, *, batch_size: int = 4096, max_tokens: int | None = None,
                    l1_coefficient: float = 0.0, dense_threshold: float = 0.1,
                    device: str | torch.device = "cpu") -> dict[str, Any]:
    """Every held-out metric for `sae` on `cache` (see sae.measure.measure)."""
    batches = iter_batches(cache, sae_layers(sae), batch_size, max_tokens)
    return measure(sae, batches, l1_coefficient=l1_coefficient, dense_threshold=dense_threshold, device=device)
