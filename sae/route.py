"""RouteSAE (Shi et al. 2025, arXiv 2503.08200; SAE_REFERENCE.md §7) and RouteMatryoshkaSAE (§8).

Input: raw activations of the same tokens at n_layers layers, x [B, n_layers, d_in], each layer
scaled by its own `input_scale`. A router `nn.Linear(d_in, n_layers, bias=False)` reads
v = sum (or mean, `aggre`) over layers and gives p = softmax(W_router v) [B, n_layers].
- hard routing: i* = argmax p, x_route = p_{i*} x_{i*}, layer weights one-hot (the router learns
  only through p_{i*});
- soft routing: x_route = sum_i p_i x_i, layer weights p.
One shared SAE (TopK for RouteSAE, Matryoshka/BatchTopK for RouteMatryoshkaSAE) reconstructs
x_route, which is `target`; AuxK is included, b_dec is initialised from x_route, and the Matryoshka
variant uses its threshold at inference.

Loss normalisation (a deliberate difference from the single-layer SAEs): the optimised term is
NMSE_tok = mean_t ||x_route - x_hat||^2 / ||x_route||^2 (as the RouteSAE code), logged as `nmse`;
plain `mse` is logged beside it. With a plain squared error the router could lower the loss just by
flattening p, since x_route (and its error) shrinks with p_{i*}; the per-token ratio removes that
incentive.

Splicing (`reconstruct_routed`, also what `reconstruct` returns): the chosen layer's own
activation x_{i*}, unscaled by p, goes through the SAE, as the paper patches; the reconstruction is
returned in that layer's raw units with the layer index. With soft routing, the layer is argmax p.
The splice input is larger than the training input x_route by 1/p_{i*}: per-token TopK barely
notices (its selection is scale-free up to the biases), but RouteMatryoshkaSAE's threshold, set on
x_route, then lets more latents through than in training.
`encode`/`forward` describe x_route; `decode` returns x_route's normalised units (x_route mixes
layers, so it has no single raw unit).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae.base import SAEConfig, SAESettings, geometric_median
from sae.matryoshka import MatryoshkaSAE
from sae.registry import register
from sae.sparse_decode import densify
from sae.topk import TopKSAE


class _Routed(TopKSAE):
    """Routing around a TopK-family SAE. Comes before the SAE class in the bases (RouteMatryoshkaSAE:
    before MatryoshkaSAE), so its methods wrap that class's, which it reuses on x_route. Not registered."""

    routed = True
    recon_name = "nmse"
    bf16_auto = False  # not quality-checked in bf16 yet (the router's softmax): `auto` keeps float32
    base_sae_type: ClassVar[Literal["topk", "matryoshka"]] = "topk"

    @classmethod
    def check_settings(cls, settings: SAESettings) -> None:
        super().check_settings(settings)
        if settings.base_sae_type not in (None, cls.base_sae_type):
            raise ValueError(
                f"{cls.type_name} shares a {cls.base_sae_type!r} SAE, but model.base_sae_type is "
                f"{settings.base_sae_type!r}; use type {'route_matryoshka' if cls.base_sae_type == 'topk' else 'route'}"
                f" or set base_sae_type: {cls.base_sae_type} (or leave it unset)"
            )

    def _init_router(self, cfg: SAEConfig) -> None:
        if cfg.base_sae_type is None:  # the one this type implies, recorded in sae.json
            self.cfg = replace(self.cfg, base_sae_type=self.base_sae_type)
        self.router = nn.Linear(cfg.hidden_size, cfg.n_layers, bias=False)
        if self.router.out_features != cfg.n_layers:  # the router's size is the routed layer count
            raise AssertionError("router size must equal n_layers")

    def route(self, xn: Tensor) -> dict[str, Tensor]:
        """Normalised x [B, L, d] -> `x_route` [B, d], `router_probs` [B, L], `layer_weights`
        [B, L] (one-hot for hard routing, p for soft), `layer_idx` [B] (argmax p)."""
        v = xn.sum(dim=1) if self.cfg.aggre == "sum" else xn.mean(dim=1)
        probs = torch.softmax(self.router(v), dim=-1)
        idx = probs.argmax(dim=-1)
        if self.cfg.routing == "hard":
            p_star = probs.gather(1, idx[:, None])  # [B, 1]
            x_route = p_star * xn[torch.arange(xn.shape[0], device=xn.device), idx]
            weights = F.one_hot(idx, self.cfg.n_layers).to(probs.dtype)
        else:
            x_route = (probs[..., None] * xn).sum(dim=1)
            weights = probs
        return {"x_route": x_route, "router_probs": probs, "layer_weights": weights, "layer_idx": idx}

    def forward(self, x: Tensor, dense_acts: bool = True) -> dict[str, Tensor]:
        """Raw x [B, n_layers, d_in] -> the shared SAE's dict on x_route (target = x_route), plus
        `router_probs`, `layer_weights` [B, n_layers] and `layer_idx` [B]."""
        if x.dim() != 3:
            raise ValueError(
                f"{type(self).type_name}.forward takes [B, n_layers={self.cfg.n_layers}, {self.d_in}], "
                f"got shape {tuple(x.shape)}"
            )
        r = self.route(self._prepare(x))
        out = self._forward_normalised(r.pop("x_route"), dense_acts)
        out.update(r)
        return out

    def encode(self, x: Tensor, active_groups: int | None = None) -> Tensor:
        """Raw x [..., n_layers, d_in] -> latents of x_route [..., d_sae] (Matryoshka: with
        active_groups=g, only the first g groups)."""
        xn = self._prepare(x)
        lead = xn.shape[:-2]
        r = self.route(xn.reshape(-1, self.cfg.n_layers, self.d_in))
        sel, vals, *_ = self.encode_selection(r["x_route"], keep_preacts=False)
        latents = densify(sel, vals).reshape(*lead, self.d_sae)
        if active_groups is not None:
            if not isinstance(self, MatryoshkaSAE):
                raise ValueError("active_groups applies to Matryoshka SAEs only")
            latents = self._keep_groups(latents, active_groups)
        return latents

    def decode(self, latents: Tensor) -> Tensor:
        """Latents [..., d_sae] -> x_route reconstruction [..., d_in] in normalised units."""
        return latents.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        """Same as `reconstruct_routed`: a routed splice needs the layer as well as the reconstruction."""
        return self.reconstruct_routed(x)

    def reconstruct_routed(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Raw x [B, n_layers, d_in] -> (x_hat [B, d_in] in the raw units of the chosen layer,
        layer_idx [B]): the SAE applied to the chosen layer's activation unscaled by p."""
        if x.dim() != 3:
            raise ValueError(f"reconstruct_routed takes [B, n_layers, d_in], got shape {tuple(x.shape)}")
        xn = self._prepare(x)
        idx = self.route(xn)["layer_idx"]
        chosen = xn[torch.arange(xn.shape[0], device=xn.device), idx]
        recon = self._forward_normalised(chosen, dense_acts=False)["sae_out"]
        return recon / self.input_scale[idx][:, None].to(recon.dtype), idx

    def _recon_error(self, target: Tensor, recon: Tensor) -> Tensor:
        """NMSE_tok: mean over tokens of ||target - recon||^2 / ||target||^2."""
        per_token = (target - recon).pow(2).sum(dim=-1) / target.pow(2).sum(dim=-1).clamp_min(1e-12)
        return per_token.mean()

    def to_saelens(self) -> tuple[str, dict[str, Tensor], dict[str, Any]]:
        raise ValueError(f"{type(self).type_name} has no SAELens counterpart: SAELens has no routed SAE")

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        """b_dec = geometric median of x_route (with the initial router) over raw x [n, L, d]."""
        x_route = self.route(self._prepare(x.float()))["x_route"]
        self.b_dec.copy_(geometric_median(x_route).to(self.b_dec.dtype))


@register("RouteSAE", "route")
class RouteSAE(_Routed, TopKSAE):
    def __init__(self, cfg: SAEConfig):
        TopKSAE.__init__(self, cfg)
        self._init_router(cfg)


@register("RouteMatryoshkaSAE", "route_matryoshka")
class RouteMatryoshkaSAE(_Routed, MatryoshkaSAE):
    base_sae_type = "matryoshka"

    def __init__(self, cfg: SAEConfig):
        MatryoshkaSAE.__init__(self, cfg)
        self._init_router(cfg)
