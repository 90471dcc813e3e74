"""GatedSAE (Rajamanoharan et al. 2024a, arXiv 2404.16014; SAE_REFERENCE.md section 2).

    u       = W_gate (x - b_dec)
    pi_gate = u + b_gate                      decides which latents fire
    pi_mag  = exp(r_mag) * u + b_mag          decides how much (W_mag = diag(exp r_mag) W_gate)
    f       = 1[pi_gate > 0] * ReLU(pi_mag)
    xhat    = W_dec f + b_dec

    L = ||x - xhat||^2 + lambda * ||ReLU(pi_gate)||_1 + ||x - (sg(W_dec) ReLU(pi_gate) + sg(b_dec))||^2

The Heaviside gate passes no gradient, so the gate path (W_gate via pi_gate, b_gate) learns only
from the sparsity and auxiliary terms; dropping the auxiliary term ([ZP], [RS]) leaves b_gate
untrained. The auxiliary term must not move the decoder: besides the frozen decoder copy, its
gate pre-activation uses sg(b_dec) at the encoder input too, so W_dec and b_dec get no gradient
from it at all (DL's version lets b_dec learn from it through the encoder input).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from sae.base import BaseSAE, SAEConfig
from sae.registry import register
from sae.vanilla import require_single_layer, squared_error, tied_init


@register("GatedSAE", "gated")
class GatedSAE(BaseSAE):
    """Parameters: W_gate [d_in, d_sae]; b_gate, r_mag, b_mag [d_sae]; W_dec [d_sae, d_in] (unit
    rows); b_dec [d_in]."""

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        require_single_layer(cfg, type(self).__name__)
        w_gate, w_dec = tied_init(cfg.latent_size, cfg.hidden_size)
        self.W_gate = nn.Parameter(w_gate)
        self.b_gate = nn.Parameter(torch.zeros(cfg.latent_size))
        self.r_mag = nn.Parameter(torch.zeros(cfg.latent_size))
        self.b_mag = nn.Parameter(torch.zeros(cfg.latent_size))
        self.W_dec = nn.Parameter(w_dec)
        self.b_dec = nn.Parameter(torch.zeros(cfg.hidden_size))

    def _pre_acts(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, d_in] normalised -> (pi_gate, pi_gate with sg(b_dec) at the input, pi_mag), each
        [B, d_sae]. One GEMM serves both gate versions: W(x - b) = Wx - Wb."""
        xw = x @ self.W_gate
        bw = self.b_dec @ self.W_gate
        u = xw - bw
        pi_gate = u + self.b_gate
        pi_gate_sg = xw - bw.detach() + self.b_gate
        pi_mag = torch.exp(self.r_mag) * u + self.b_mag
        return pi_gate, pi_gate_sg, pi_mag

    @staticmethod
    def _gated(pi_gate: Tensor, pi_mag: Tensor) -> Tensor:
        return (pi_gate > 0).to(pi_mag.dtype) * torch.relu(pi_mag)

    def encode(self, x: Tensor) -> Tensor:
        """Raw x [..., d_in] -> latents f [..., d_sae] (>= 0)."""
        self.check_input(x)
        x = self.normalise(x).to(self.W_gate.dtype)
        u = (x - self.b_dec) @ self.W_gate
        return self._gated(u + self.b_gate, torch.exp(self.r_mag) * u + self.b_mag)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents [..., d_sae] -> reconstruction [..., d_in] in raw units."""
        return (latents.to(self.W_dec.dtype) @ self.W_dec + self.b_dec) / self.input_scale.to(self.W_dec.dtype)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Raw x [B, d_in] -> {target, sae_out: [B, d_in] normalised; feature_acts: [B, d_sae];
        gate_acts: ReLU(pi_gate) [B, d_sae]; gate_acts_sg: the same with sg(b_dec) (aux term)}."""
        self.check_input(x)
        x = self.normalise(x).to(self.W_gate.dtype)
        pi_gate, pi_gate_sg, pi_mag = self._pre_acts(x)
        f = self._gated(pi_gate, pi_mag)
        return {
            "target": x,
            "sae_out": f @ self.W_dec + self.b_dec,
            "feature_acts": f,
            "gate_acts": torch.relu(pi_gate),
            "gate_acts_sg": torch.relu(pi_gate_sg),
        }

    def loss(
        self, out: dict[str, Tensor], *, l1_coefficient: float = 0.0, dead_mask: Tensor | None = None
    ) -> dict[str, Tensor]:
        """{mse, l1, aux, total}: unweighted per-token means; total = mse + lambda * l1 + aux.
        l1 = ||ReLU(pi_gate)||_1; aux reconstructs from the gate through a frozen decoder."""
        mse = squared_error(out["sae_out"], out["target"])
        l1 = out["gate_acts"].float().sum(dim=-1).mean()
        aux_out = out["gate_acts_sg"] @ self.W_dec.detach() + self.b_dec.detach()
        aux = squared_error(aux_out, out["target"])
        return {"mse": mse, "l1": l1, "aux": aux, "total": mse + l1_coefficient * l1 + aux}

    def to_saelens(self) -> tuple[str, dict[str, Tensor], dict[str, Any]]:
        """SAELens "gated" (W_gate becomes its W_enc)."""
        p = self._saelens_folded("W_gate")
        return "gated", {k: p[k] for k in ("W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec")}, {}
