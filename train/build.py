"""Config + cache -> the SAE to train: which layers, d_in, normalisation, provenance.

Checks that name the fix: a layer the cache does not hold, a `model.hidden_size` that differs from
the cache's d_model, a routed range outside the cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

import sae as zoo
from sae import BaseSAE, SAEConfig
from settings import ModelConfig


class BuildError(ValueError):
    """The config does not fit the cache; the message names the key and the fix."""


@dataclass(frozen=True)
class LayerChoice:
    layers: list[int]
    routed: bool
    notes: list[str] = field(default_factory=list)  # defaults taken, for the log

    @property
    def loader_layers(self) -> int | list[int]:
        """What the loader takes: an int for [B, d] batches, a list for [B, L, d]."""
        return self.layers if self.routed else self.layers[0]


def is_routed(type_name: str) -> bool:
    try:
        cls = zoo.registry.get(type_name)
    except ValueError as e:
        raise BuildError(f"model.type: {e}") from e
    return cls.routed


def resolve_layers(m: ModelConfig, cache_layers: list[int], cache_path: str = "the cache") -> LayerChoice:
    """Single-layer SAEs: `model.layer`, else the cache's middle layer. Routed SAEs: blocks
    [start_layer, end_layer) (either end defaults to the cache's), else every layer of the cache."""
    if not cache_layers:
        raise BuildError(f"{cache_path} holds no layers")
    if not is_routed(m.type):
        if m.layer is None:
            layer = cache_layers[len(cache_layers) // 2]
            note = f"model.layer is unset: using the cache's middle layer {layer} (of {cache_layers})"
            return LayerChoice([layer], False, [note])
        if m.layer not in cache_layers:
            raise BuildError(
                f"model.layer={m.layer} is not in {cache_path}, which holds layers {cache_layers}; "
                "set model.layer to one of them or harvest that layer"
            )
        return LayerChoice([m.layer], False)
    if m.start_layer is None and m.end_layer is None:
        return LayerChoice(list(cache_layers), True, [f"routing over all the cache's layers {cache_layers}"])
    start = cache_layers[0] if m.start_layer is None else m.start_layer
    end = cache_layers[-1] + 1 if m.end_layer is None else m.end_layer
    layers = list(range(start, end))
    missing = [x for x in layers if x not in cache_layers]
    if not layers or missing:
        what = "is empty" if not layers else f"needs layers {missing}, which are not in {cache_path}"
        raise BuildError(
            f"routed range model.start_layer:end_layer = {start}:{end} {what} (the cache holds {cache_layers}); "
            "set a half-open range inside the cache, or leave both unset to route over every cached layer"
        )
    return LayerChoice(layers, True)


def check_d_in(m: ModelConfig, d_model: int) -> int:
    if m.hidden_size is not None and m.hidden_size != d_model:
        raise BuildError(
            f"model.hidden_size={m.hidden_size} does not match the cache's d_model={d_model}; "
            "remove model.hidden_size (it defaults to the cache's) or train on a cache of that model"
        )
    return d_model


def sae_config(m: ModelConfig, d_in: int, choice: LayerChoice) -> SAEConfig:
    """The SAE's config: the `model` section's SAE settings (validated when the config was loaded)
    plus d_in and the layers read."""
    try:
        return SAEConfig.from_settings(m, hidden_size=d_in, layers=choice.layers)
    except (TypeError, ValueError) as e:
        raise BuildError(f"model section: {e}") from e


def build_sae(m: ModelConfig, d_in: int, choice: LayerChoice, scales: list[float], seed: int) -> BaseSAE:
    """A freshly initialised SAE (seeded) with its per-layer input scales set."""
    cfg = sae_config(m, d_in, choice)
    torch.manual_seed(seed)
    try:
        model = zoo.get(cfg.type)(cfg)
    except ValueError as e:
        raise BuildError(f"cannot build {cfg.type}: {e}") from e
    model.set_input_scale(torch.tensor(scales, dtype=torch.float32))
    return model


def input_scales(cache: Any, layers: list[int]) -> list[float]:
    """sqrt(d) / mean norm of each layer on the train split (SAE_REFERENCE.md, normalisation)."""
    return [float(cache.norm_scale(layer)) for layer in layers]


@torch.no_grad()
def init_from_sample(model: BaseSAE, x: Tensor, max_rows: int = 4096) -> None:
    """`init_from_data` on up to `max_rows` rows of the first batch (x [B, d] or [B, L, d])."""
    model.init_from_data(x[:max_rows].float())


def provenance(cache: Any, choice: LayerChoice, scales: list[float], run_name: str) -> dict[str, Any]:
    """The SAE's meta: where its training data came from and how it was normalised."""
    return {
        "cache": str(cache.path),
        "cache_identity": cache.identity,
        "language_model": cache.metadata.get("model", cache.identity.get("model")),
        "layers": list(choice.layers),
        "normalisation": {"kind": "scalar per layer: sqrt(d) / mean norm on the train split",
                          "input_scale": dict(zip(map(str, choice.layers), scales, strict=True))},
        "run": run_name,
    }
