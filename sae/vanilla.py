"""VanillaSAE: ReLU encoder, L1 sparsity penalty, unit-norm decoder (SAE_REFERENCE.md section 1).

    f    = ReLU(W_enc (x - b_dec) + b_enc)
    xhat = W_dec f + b_dec
    loss = ||x - xhat||^2 + lambda * ||f||_1      (sums over d and latents, means over tokens)

The L1 penalty only means something with ||d_j|| = 1 (otherwise the model shrinks f and grows
the decoder), so the trainer keeps decoder rows unit-norm (`normalize_decoder`,
`remove_parallel_grads`). The helpers at the bottom are shared with the Gated and JumpReLU SAEs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from sae.base import BaseSAE, SAEConfig, kaiming_unit_rows
from sae.registry import register


@register("VanillaSAE", "vanilla")
class VanillaSAE(BaseSAE):
    """Parameters: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in] (unit rows), b_dec [d_in]."""

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        require_single_layer(cfg, type(self).__name__)
        w_enc, w_dec = tied_init(cfg.latent_size, cfg.hidden_size)
        self.W_enc = nn.Parameter(w_enc)
        self.b_enc = nn.Parameter(torch.zeros(cfg.latent_size))
        self.W_dec = nn.Parameter(w_dec)
        self.b_dec = nn.Parameter(torch.zeros(cfg.hidden_size))

    def _acts(self, x: Tensor) -> Tensor:
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def encode(self, x: Tensor) -> Tensor:
        """Raw x [..., d_in] -> latents f [..., d_sae] (>= 0)."""
        self.check_input(x)
        return self._acts(self.normalise(x).to(self.W_enc.dtype))

    def decode(self, latents: Tensor) -> Tensor:
        """Latents [..., d_sae] -> reconstruction [..., d_in] in raw units."""
        return (latents.to(self.W_dec.dtype) @ self.W_dec + self.b_dec) / self.input_scale.to(self.W_dec.dtype)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Raw x [B, d_in] -> {target, sae_out: [B, d_in] normalised; feature_acts: [B, d_sae]}."""
        self.check_input(x)
        x = self.normalise(x).to(self.W_enc.dtype)
        f = self._acts(x)
        return {"target": x, "sae_out": f @ self.W_dec + self.b_dec, "feature_acts": f}

    def loss(
        self, out: dict[str, Tensor], *, l1_coefficient: float = 0.0, dead_mask: Tensor | None = None
    ) -> dict[str, Tensor]:
        """{mse, l1, total}: mse and l1 are unweighted per-token means; total = mse + lambda * l1."""
        mse = squared_error(out["sae_out"], out["target"])
        l1 = out["feature_acts"].float().abs().sum(dim=-1).mean()
        return {"mse": mse, "l1": l1, "total": mse + l1_coefficient * l1}

    def to_saelens(self) -> tuple[str, dict[str, Tensor], dict[str, Any]]:
        """SAELens "standard"."""
        p = self._saelens_folded()
        return "standard", {k: p[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}, {}


def require_single_layer(cfg: SAEConfig, name: str) -> None:
    if cfg.n_layers != 1:
        raise ValueError(
            f"{name} reads one layer, but the config has n_layers={cfg.n_layers}; "
            "use a Route* SAE to read several layers, or set n_layers: 1"
        )


def tied_init(d_sae: int, d_in: int) -> tuple[Tensor, Tensor]:
    """(W_enc [d_in, d_sae], W_dec [d_sae, d_in]): random unit decoder rows, encoder = decoder^T
    (DL/OAI), so that at init each latent reads the direction it writes."""
    w_dec = kaiming_unit_rows(d_sae, d_in)
    return w_dec.T.clone(), w_dec


def squared_error(sae_out: Tensor, target: Tensor) -> Tensor:
    """||target - sae_out||^2 summed over d_in, mean over tokens; float32 accumulation so that a
    bf16 model does not lose the loss to rounding. [B, d_in] x2 -> scalar."""
    return (sae_out.float() - target.float()).pow(2).sum(dim=-1).mean()
