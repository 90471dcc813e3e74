"""JumpReLUSAE (Rajamanoharan et al. 2024b, arXiv 2407.14435; SAE_REFERENCE.md section 5).

    pi   = W_enc (x - b_dec) + b_enc
    f    = pi * H(pi - theta)
    xhat = W_dec f + b_dec
    L    = ||x - xhat||^2 + lambda * sum_j H(pi_j - theta_j)

H has no useful derivative, so both jumps use straight-through pseudo-derivatives with the
rectangle kernel K(u) = 1[|u| < 1/2] and bandwidth eps:
    df/dpi = H(pi - theta)       df/dtheta = -(theta/eps) K((pi - theta)/eps)
    dH/dpi = 0                   dH/dtheta = -(1/eps) K((pi - theta)/eps)
The L0 step is applied to pi, not to f ([RS] feeds f, which hides half the kernel from theta).

Choices, with reasons:
- b_dec is subtracted at the encoder input (as SL; DL and the paper do not). It is a
  reparametrisation of b_enc, but it keeps all three ReLU-family SAEs alike and lets the
  geometric-median init of b_dec centre what the encoder sees.
- theta is trained directly, not as log theta (as DL and SL since SL PR #718): Adam moves a
  parameter by about lr per step, so in log space theta moves by only theta * lr per step and a
  small initial theta is effectively frozen. Positivity, which log theta gave for free, is kept
  by `update_after_step` projecting theta onto theta >= 0 after each optimiser step.
- theta stays float32 when the module is cast to bf16/fp16 (`_apply`): Adam's steps of ~lr
  round away at bf16's ~0.4% resolution, and the threshold stops learning.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from sae.base import BaseSAE, SAEConfig, SAESettings
from sae.registry import register
from sae.vanilla import require_single_layer, squared_error, tied_init

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _rectangle(u: Tensor) -> Tensor:
    return (u.abs() < 0.5).float()


def _theta_grad(grad: Tensor) -> Tensor:
    """Sum a [..., d_sae] per-token gradient to theta's [d_sae]."""
    return grad.reshape(-1, grad.shape[-1]).sum(dim=0)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, pre: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        # The comparison runs in float32 so that a bf16 pi meets the exact float32 threshold.
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre.float() > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, Tensor, None]:
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        d = pre.float() - theta
        grad_pre = grad_out * (d > 0).to(grad_out.dtype)
        grad_theta = _theta_grad(-(theta / eps) * _rectangle(d / eps) * grad_out.float())
        return grad_pre, grad_theta, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, pre: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre.float() > theta).float()

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[None, Tensor, None]:
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = _theta_grad(-(1.0 / eps) * _rectangle((pre.float() - theta) / eps) * grad_out.float())
        return None, grad_theta, None  # dH/dpi := 0; None spares a [B, d_sae] tensor of zeros


def jumprelu(pre: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
    """f = pre * H(pre - theta) with the rectangle-kernel STE for theta. pre [..., M], theta [M]
    float32 -> f [..., M] in pre's dtype."""
    return _JumpReLU.apply(pre, theta, bandwidth)


def step(pre: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
    """H(pre - theta) as float32 [..., M]; gradient only into theta (dH/dpre := 0)."""
    return _Step.apply(pre, theta, bandwidth)


@register("JumpReLUSAE", "jumprelu")
class JumpReLUSAE(BaseSAE):
    """Parameters: W_enc [d_in, d_sae], b_enc [d_sae], threshold [d_sae] (float32, theta),
    W_dec [d_sae, d_in] (unit rows), b_dec [d_in]."""

    # bf16 passes the quality check (held-out FVU 0.1711 against 0.1715 in float32 after one epoch on the
    # default cache) but does not pay on a CPU: the dense step's elementwise work on [B, d_sae] dominates
    # and bf16 ran at 0.98x float32. `training.dtype=bfloat16` still applies it when asked.
    bf16_auto = False

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        require_single_layer(cfg, type(self).__name__)
        w_enc, w_dec = tied_init(cfg.latent_size, cfg.hidden_size)
        self.W_enc = nn.Parameter(w_enc)
        self.b_enc = nn.Parameter(torch.zeros(cfg.latent_size))
        self.threshold = nn.Parameter(torch.full((cfg.latent_size,), float(cfg.threshold)))
        self.W_dec = nn.Parameter(w_dec)
        self.b_dec = nn.Parameter(torch.zeros(cfg.hidden_size))

    @classmethod
    def check_settings(cls, settings: SAESettings) -> None:
        super().check_settings(settings)
        if settings.threshold < 0 or settings.bandwidth <= 0:
            raise ValueError(
                f"JumpReLU needs threshold >= 0 and bandwidth > 0, got threshold={settings.threshold}, "
                f"bandwidth={settings.bandwidth}; set model.threshold / model.bandwidth"
            )

    def _pre_acts(self, x: Tensor) -> Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        """Raw x [..., d_in] -> latents f [..., d_sae] (zero where pi <= theta)."""
        self.check_input(x)
        pre = self._pre_acts(self.normalise(x).to(self.W_enc.dtype))
        return jumprelu(pre, self.threshold, self.cfg.bandwidth)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents [..., d_sae] -> reconstruction [..., d_in] in raw units."""
        return (latents.to(self.W_dec.dtype) @ self.W_dec + self.b_dec) / self.input_scale.to(self.W_dec.dtype)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Raw x [B, d_in] -> {target, sae_out: [B, d_in] normalised; feature_acts: [B, d_sae];
        pre_acts: pi [B, d_sae] (the L0 step reads it)}."""
        self.check_input(x)
        x = self.normalise(x).to(self.W_enc.dtype)
        pre = self._pre_acts(x)
        f = jumprelu(pre, self.threshold, self.cfg.bandwidth)
        return {"target": x, "sae_out": f @ self.W_dec + self.b_dec, "feature_acts": f, "pre_acts": pre}

    def loss(
        self, out: dict[str, Tensor], *, l1_coefficient: float = 0.0, dead_mask: Tensor | None = None
    ) -> dict[str, Tensor]:
        """{mse, l0, total}: mse and l0 (active latents per token) are unweighted means;
        total = mse + lambda * l0, lambda being the config's `l1_coefficient`."""
        mse = squared_error(out["sae_out"], out["target"])
        l0 = step(out["pre_acts"], self.threshold, self.cfg.bandwidth).sum(dim=-1).mean()
        return {"mse": mse, "l0": l0, "total": mse + l1_coefficient * l0}

    def to_saelens(self) -> tuple[str, dict[str, Tensor], dict[str, Any]]:
        """SAELens "jumprelu" (theta as it is: pre-activations are unchanged by the folded scale)."""
        p = self._saelens_folded()
        return "jumprelu", {k: p[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}, {}

    @torch.no_grad()
    def update_after_step(self, out: dict[str, Tensor]) -> None:
        """Project theta onto theta >= 0 (see the module docstring)."""
        self.threshold.clamp_(min=0.0)

    def _apply(self, fn, recurse: bool = True):
        # .to(bf16)/.half() would round theta; keep its float32 values and follow only the device.
        keep = self.threshold.detach().clone()
        super()._apply(fn, recurse)
        theta = self.threshold
        if theta.dtype in _LOW_PRECISION:
            theta.data = keep.to(device=theta.device, dtype=torch.float32)
            if theta.grad is not None:
                theta.grad = theta.grad.float()
        return self
