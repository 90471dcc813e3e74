"""Turning the optimiser and the RNGs into plain tensors + JSON and back (no pickle anywhere).

Adam's state_dict is {'state': {index: {'step', 'exp_avg', 'exp_avg_sq'}}, 'param_groups': [...]};
tensors go to `state.<index>.<key>`, the param groups (floats, bools, lists) to JSON. Parameter
names are stored beside the indices so that a checkpoint from a different model is refused
instead of loading moments into the wrong tensors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def optimizer_to_tensors(opt: torch.optim.Optimizer, model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """-> (tensors, JSON meta) describing `opt`'s full state."""
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"state.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars, "param_names": _param_names(opt, model)}


def optimizer_from_tensors(
    opt: torch.optim.Optimizer, model: nn.Module, tensors: dict[str, Tensor], meta: dict[str, Any]
) -> None:
    """Restore `opt` from `optimizer_to_tensors`' output; refuses a different parameter layout."""
    names = _param_names(opt, model)
    if meta.get("param_names") != names:
        raise ValueError(
            f"the checkpoint's optimiser holds parameters {meta.get('param_names')}, this model has {names}; "
            "it comes from a different SAE configuration"
        )
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta.get("scalars", {}).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_to_tensors() -> dict[str, Tensor]:
    """The torch RNG states (CPU, and every CUDA device) as uint8 tensors. The loop draws randomness
    only through torch; the loader's order is a pure function of (seed, epoch, batch)."""
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def rng_from_tensors(tensors: dict[str, Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


def _param_names(opt: torch.optim.Optimizer, model: nn.Module) -> list[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id.get(id(p), "?") for g in opt.param_groups for p in g["params"]]
