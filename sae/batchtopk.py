"""BatchTopKSAE (Bussmann, Leask, Nanda 2024; SAE_REFERENCE.md §4).

Training keeps the k*B largest ReLU pre-activations over the flattened batch (per-token L0 varies;
its mean is k). Inference uses one global threshold theta instead, f = a * 1[a > theta], so a
token's latents do not depend on the rest of its batch.

theta is a float32 buffer, 0 until estimated. `update_after_step` (called by the trainer after
each training step, from the step where the threshold estimate should start) sets it to the
smallest positive kept activation of the batch the first time, then follows an EMA with momentum
`threshold_momentum`. Starting from the first observation rather than from 0 avoids a long bias
towards 0 in short runs.

If theta was never estimated, eval mode falls back to per-token TopK with k (still independent of
the batch) and warns once: an untrained or freshly initialised model stays usable and the
fallback is visible.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from sae.base import SAEConfig
from sae.registry import register
from sae.selection import Selection, select_batch_topk, select_threshold, select_topk
from sae.topk import TopKSAE


@register("BatchTopKSAE", "batchtopk")
class BatchTopKSAE(TopKSAE):
    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float32))
        self._warned_no_threshold = False

    def select(self, z: Tensor) -> Selection:
        # On z rather than ReLU(z), saving a [B, d_sae] pass: the kept values go through ReLU
        # anyway, so the two can differ only in which zero-valued entries are kept; theta > 0.
        if self.training:
            return select_batch_topk(z, self.cfg.k)
        theta = float(self.threshold)
        if theta > 0:
            return select_threshold(z, theta)
        if not self._warned_no_threshold:
            warnings.warn(
                f"{type(self).type_name}: inference threshold was never estimated (it is 0); "
                f"using per-token TopK with k={self.cfg.k} instead",
                stacklevel=2,
            )
            self._warned_no_threshold = True
        return select_topk(z, self.cfg.k)

    @torch.no_grad()
    def update_after_step(self, out: dict[str, Tensor]) -> None:
        """EMA of the smallest positive kept activation (training mode only)."""
        if not self.training:
            return
        vals = out["sel_val"].detach().float()
        if vals.numel() == 0:
            return
        # Tensor ops only, no host sync: inf marks "no positive kept value in this batch".
        low = torch.where(vals > 0, vals, torch.full_like(vals, float("inf"))).min()
        m = self.cfg.threshold_momentum
        theta = self.threshold
        ema = torch.where(theta == 0, low, m * theta + (1.0 - m) * low)
        self.threshold.copy_(torch.where(torch.isinf(low), theta, ema))

    def _apply(self, fn, recurse=True):
        # theta stays float32 even when the model is cast to a low-precision dtype: an EMA with
        # momentum 0.99 stalls in bf16.
        super()._apply(fn, recurse)
        if self.threshold.dtype != torch.float32:
            self.threshold = self.threshold.float()
        return self
