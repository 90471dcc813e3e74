"""The one typed description of an SAE's settings.

`SAESettings` holds what a user chooses (the SAE keys of the config's `model` section, in the layout of
the original SAEs README); `settings.schema.ModelConfig` extends it with the keys that choose the data
(which language model, which layers), so the config loader checks these keys, their types and their
allowed values (`Literal`s, registered types, each class's own rules) when a config is loaded, and
every CLI's --help lists them with the comments written here. `SAEConfig` adds what the data decides
(d_in, the layers read): it is what an SAE is built from and what `sae.json` stores.

Configs also arrive from sae.json files on disk, so `SAEConfig.from_dict` checks every key's type by
the annotations below and refuses unknown keys, naming them.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Literal

DecodeImpl = Literal["auto", "sparse", "dense"]


@dataclass(kw_only=True)
class SAESettings:
    """The SAE's own settings (hyperparameters), as a user writes them under `model:`."""

    type: str = "topk"  # registry name or alias (sae.registry.names(); `make train MODEL=nonsense` lists them)
    latent_size: int = 3072  # d_sae, the dictionary size
    k: int = 32  # TopK family: active latents per token (BatchTopK: on average over the batch)
    threshold: float = 0.001  # JumpReLU: initial theta
    bandwidth: float = 0.001  # JumpReLU: width of the straight-through estimator's rectangle
    group_sizes: list[int] | None = None  # Matryoshka: nested group sizes, summing to latent_size
    base_sae_type: Literal["topk", "matryoshka"] | None = None  # Route*: the shared SAE; None = implied by the type
    aggre: Literal["sum", "mean"] = "sum"  # Route*: router input, the sum or the mean over layers
    routing: Literal["hard", "soft"] = "hard"  # Route*: one layer per token (argmax) or a softmax mix
    aux_k: int | None = None  # TopK family: AuxK latents; None = hidden_size // 2
    aux_k_coef: float = 0.03125  # TopK family: weight of the AuxK loss
    threshold_momentum: float = 0.99  # BatchTopK/Matryoshka: EMA momentum of the inference threshold
    # TopK family, speed only (the math is the same): sparse (embedding_bag decode, sparse backward),
    # dense (GEMMs), or auto (sparse where bench/bench_sae_decode.py measured it faster)
    decode_impl: DecodeImpl = "auto"

    def validate(self) -> None:
        """Types (by annotation), ranges, the registered type and that class's own rules; raises
        TypeError/ValueError naming the key."""
        check_types(self)
        if self.latent_size <= 0:
            raise ValueError(f"latent_size={self.latent_size} must be positive")
        if not 0 < self.k <= self.latent_size:
            raise ValueError(f"k={self.k} must be in 1..latent_size={self.latent_size}")
        if self.group_sizes is not None:
            if not self.group_sizes or any(g <= 0 for g in self.group_sizes):
                raise ValueError(f"group_sizes {self.group_sizes} must be a non-empty list of positive sizes")
            if sum(self.group_sizes) != self.latent_size:
                raise ValueError(f"group_sizes {self.group_sizes} sum to {sum(self.group_sizes)}, "
                                 f"but latent_size is {self.latent_size}; make them add up")
        if self.aux_k is not None and self.aux_k <= 0:
            raise ValueError(f"aux_k={self.aux_k} must be positive (or null for hidden_size // 2)")
        if not 0.0 <= self.threshold_momentum < 1.0:
            raise ValueError(f"threshold_momentum={self.threshold_momentum} must be in [0, 1)")
        from sae import registry  # the registry imports every architecture, which import this module

        registry.get(self.type).check_settings(self)


@dataclass(kw_only=True)
class SAEConfig(SAESettings):
    """What an SAE is built from: its settings plus what the data decides. Stored in sae.json."""

    hidden_size: int  # d_in
    n_layers: int = 1  # Route*: number of routed layers; 1 for single-layer SAEs
    layers: list[int] = field(default_factory=list)  # cache blocks this SAE reads (provenance)

    def validate(self) -> None:
        super().validate()
        if self.hidden_size <= 0:
            raise ValueError(f"hidden_size={self.hidden_size} must be positive")
        if self.n_layers < 1:
            raise ValueError("n_layers must be >= 1")
        if self.layers and len(self.layers) != self.n_layers:
            raise ValueError(f"layers {self.layers} do not match n_layers={self.n_layers}")

    @classmethod
    def from_settings(cls, settings: SAESettings, *, hidden_size: int, layers: list[int]) -> SAEConfig:
        """The settings' keys (every SAESettings field, none copied by hand) + d_in and the layers read."""
        chosen = {f.name: getattr(settings, f.name) for f in fields(SAESettings)}
        cfg = cls(**chosen, hidden_size=hidden_size, n_layers=len(layers), layers=list(layers))
        cfg.validate()
        return cfg

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        if not isinstance(data, dict):
            raise TypeError(f"an SAE config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SAE config keys {unknown}; known: {sorted(known)}")
        missing = sorted(k for k in ("type", "hidden_size", "latent_size") if k not in data)
        if missing:
            raise ValueError(f"SAE config lacks required keys {missing}")
        cfg = cls(**data)
        cfg.validate()
        return cfg


def check_types(obj: object) -> None:
    """Every dataclass field of `obj` against its annotation: int (not bool), finite float, str,
    Literal (naming the allowed values), list[int], and `X | None`."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        problem = _type_problem(value, hints[f.name])
        if problem is None:
            continue
        if problem.startswith("must be one of"):  # the right type, a value not allowed
            raise ValueError(f"{f.name} {problem}, got {value!r}")
        raise TypeError(f"SAE config key {f.name!r} {problem}, got {value!r}")


def _type_problem(value: Any, hint: Any) -> str | None:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        problems = [_type_problem(value, a) for a in options]
        return None if any(p is None for p in problems) else problems[0]
    if origin is Literal:
        allowed = typing.get_args(hint)
        return None if value in allowed else f"must be one of {', '.join(map(repr, allowed))}"
    if origin is list:
        ok = isinstance(value, list) and all(_type_problem(v, typing.get_args(hint)[0]) is None for v in value)
        return None if ok else "must be a list of integers"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "must be an integer"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok else "must be a finite number"
    if hint is str:
        return None if isinstance(value, str) else "must be a string"
    return None
