"""What a checkpoint holds for a run, and putting it back exactly.

Resume is refused, naming the keys, when anything that changes the arithmetic differs from the
checkpoint: the resolved `model` and `training` sections (bar the keys in IGNORED, which only
change where, how fast or how often) and the cache's identity and size (the batch order depends
on the cache's rows).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sae import BaseSAE
from settings import Config, to_dict
from train.build import LayerChoice
from train.checkpoint import Checkpoint
from train.loop import TrainState
from train.plan import RunPlan
from train.snapshot import optimizer_from_tensors, optimizer_to_tensors, rng_from_tensors, rng_to_tensors

IGNORED = frozenset({
    "training.resume", "training.overwrite", "training.device", "training.compile", "training.log_every",
    "training.checkpoint_every", "training.cache", "training.output_dir", "training.run_name",
    "training.verify_reads",
})


def resolved_config(cfg: Config, cache: Any, choice: LayerChoice, plan: RunPlan, run_dir: Path) -> Config:
    """`cfg` with every default that depends on the cache or the run's length filled in, so that the
    saved config.yaml reproduces the run on its own."""
    import sae as zoo

    out = copy.deepcopy(cfg)
    m, t = out.model, out.training
    m.type = zoo.canonical(m.type)
    m.hidden_size = cache.d_model
    if choice.routed:
        m.start_layer, m.end_layer, m.layer = choice.layers[0], choice.layers[-1] + 1, None
    else:
        m.layer = choice.layers[0]
    t.run_name, t.output_dir = run_dir.name, str(run_dir.parent)
    t.steps = plan.total_steps
    t.num_warmup_steps = plan.lr.warmup_steps
    t.sparsity_warmup_steps = plan.sparsity_warmup_steps
    t.dead_feature_threshold = plan.dead_threshold_tokens
    t.threshold_start_step = plan.threshold_start_step
    t.checkpoint_every = plan.checkpoint_every
    t.resume = t.overwrite = False
    return out


def comparable(cfg: Config) -> dict[str, Any]:
    """Flat `section.key -> value` of the keys that must not change across a resume."""
    d = to_dict(cfg)
    flat = {f"{sec}.{k}": v for sec in ("model", "training") for k, v in d[sec].items()}
    return {k: v for k, v in flat.items() if k not in IGNORED}


def checkpoint_of(model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState, resolved: Config,
                  cache: Any, plan: RunPlan) -> Checkpoint:
    opt_tensors, opt_meta = optimizer_to_tensors(optimizer, model)
    return Checkpoint(
        step=state.step,
        tensors={
            "model": dict(model.state_dict()),
            "optimizer": opt_tensors,
            "state": {"tokens_since_fired": state.tokens_since_fired, **rng_to_tensors()},
        },
        meta={
            "state": state.scalars(), "config": comparable(resolved), "cache_identity": cache.identity,
            "rows_per_epoch": plan.rows_per_epoch, "plan": plan.to_dict(), "optimizer": opt_meta,
        },
    )


def restore(ckpt: Checkpoint, model: BaseSAE, optimizer: torch.optim.Optimizer, resolved: Config, cache: Any,
            plan: RunPlan, device: torch.device) -> TrainState:
    """Check that `ckpt` belongs to this run, load it into model and optimizer, return the state.
    Raises ValueError naming what differs."""
    check_compatible(ckpt.meta, comparable(resolved), cache.identity, plan.rows_per_epoch)
    missing, unexpected = model.load_state_dict(ckpt.tensors["model"], strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint weights do not fit this SAE: missing {missing}, unexpected {unexpected}")
    optimizer_from_tensors(optimizer, model, ckpt.tensors["optimizer"], ckpt.meta["optimizer"])
    s = ckpt.meta["state"]
    state = TrainState.fresh(model.d_sae, device)
    state.tokens_since_fired = ckpt.tensors["state"]["tokens_since_fired"].to(device)
    state.step, state.tokens, state.epoch, state.batch = s["step"], s["tokens"], s["epoch"], s["batch"]
    state.train_seconds = float(s["train_seconds"])
    rng_from_tensors(ckpt.tensors["state"])
    return state


def check_compatible(meta: dict[str, Any], config: dict[str, Any], identity: dict[str, Any], rows: int) -> None:
    # The cache first: a different cache changes the derived settings too (steps, dead threshold), and
    # naming one of those would hide the real cause.
    old_id = meta.get("cache_identity", {})
    if old_id != identity:
        keys = sorted(k for k in set(old_id) | set(identity) if old_id.get(k) != identity.get(k))
        raise ValueError(f"the cache is not the one this run trained on (identity keys differ: {keys}); "
                         "point training.cache at the original cache")
    if meta.get("rows_per_epoch") != rows:
        raise ValueError(f"the cache's train split has {rows} rows, the run started with {meta.get('rows_per_epoch')} "
                         "(it was extended or rebuilt), so the batch order differs; start a new run")
    saved = meta.get("config", {})
    changed = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in changed)
        raise ValueError(
            f"the config changed since the checkpoint ({diffs}); undo those changes to resume, "
            "or start a new run (a new training.run_name, or --overwrite)"
        )
