"""Shared pieces for the loop, checkpoint and CLI tests: tiny configs, a probe SAE, zoo names.

`ProbeSAE` is the zoo's VanillaSAE recording what the loop passes to `loss`, so that the loop's own
behaviour (dead counting in tokens, the sparsity warm-up) is observed where it leaves the loop.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

import sae as zoo
from sae import SAEConfig
from sae.vanilla import VanillaSAE
from settings import Config, load_config

# Tiny tensors: with more threads than free cores, OpenMP spin-waits make each op ~50x slower.
torch.set_num_threads(1)

TINY = dict(d_model=16, n_train=2048, n_heldout=256, layers=(0, 1, 2), shard_rows=500, seq_len=16, window_seqs=8)


def tiny_config(cache: Path, out: Path, run_name: str = "run", **over: object) -> Config:
    """A config for a few dozen steps on a tiny cache; `over` maps 'section.key' (or a bare training
    key, e.g. steps=20) -> value."""
    base = {
        "training.cache": str(cache), "training.output_dir": str(out), "training.run_name": run_name,
        "model.type": "vanilla", "model.latent_size": 64, "model.k": 4, "training.batch_size": 128,
        "training.steps": 40, "training.log_every": 5, "training.checkpoint_every": 10, "training.lr": 1e-3,
        "training.shuffle_buffer_rows": 512,
        # float32 on every machine (auto would pick bf16 on a native-bf16 CPU): results do not depend on it
        "training.dtype": "float32",
    }
    base.update({k if "." in k else f"training.{k}": v for k, v in over.items()})
    return load_config([], [f"{k}={_yaml(v)}" for k, v in base.items()])


def _yaml(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ",".join(str(x) for x in v) + "]"
    return "null" if v is None else str(v)


def canonical_types() -> list[str]:
    """Every registered architecture, once (canonical class names)."""
    return sorted({zoo.canonical(n) for n in zoo.registry.names()})


def alias_of(canonical: str) -> str:
    """The short name `make train MODEL=` takes for a canonical type (the class name if none)."""
    short = [a for a, c in zoo.registry.aliases().items() if c == canonical]
    return sorted(short)[0] if short else canonical


def overrides_for(canonical: str, latent: int = 64) -> dict[str, object]:
    """Keys a type needs on a tiny cache (Matryoshka group sizes must add up to latent_size)."""
    over: dict[str, object] = {"model.latent_size": latent, "model.k": 4, "model.aux_k": None}
    if "Matryoshka" in canonical:
        over["model.group_sizes"] = [latent // 8, latent // 8, latent // 4, latent // 2]
    if canonical == "RouteMatryoshkaSAE":
        over["model.base_sae_type"] = "matryoshka"
    return over


def tiny_sae(canonical: str, d_in: int = 8, latent: int = 32, n_layers: int = 3) -> zoo.BaseSAE:
    """A small SAE of any registered type (routed ones read `n_layers` layers)."""
    over = {k.removeprefix("model."): v for k, v in overrides_for(canonical, latent).items()}
    over.pop("latent_size")
    cls = zoo.get(canonical)
    cfg = SAEConfig(type=canonical, hidden_size=d_in, latent_size=latent, n_layers=n_layers if cls.routed else 1,
                    **over)
    return cls(cfg)


def tiny_input_shape(model: zoo.BaseSAE) -> tuple[int, ...]:
    """The trailing shape of one token's input: (d_in,), routed (n_layers, d_in)."""
    return (model.cfg.n_layers, model.d_in) if model.routed else (model.d_in,)


class ProbeSAE(VanillaSAE):
    """VanillaSAE (f = ReLU(W_enc (x - b_dec) + b_enc), loss = mse + lambda * l1) that records
    (l1_coefficient, dead_mask) of every loss call in `calls`."""

    def __init__(self, d_in: int, d_sae: int):
        super().__init__(SAEConfig(type="VanillaSAE", hidden_size=d_in, latent_size=d_sae, k=1))
        self.calls: list[tuple[float, Tensor]] = []

    def loss(self, out, *, l1_coefficient=0.0, dead_mask=None):
        if dead_mask is not None:  # training calls; held-out metrics pass none
            self.calls.append((l1_coefficient, dead_mask.clone()))
        return super().loss(out, l1_coefficient=l1_coefficient, dead_mask=dead_mask)
