"""BatchTopKSAE (Bussmann, Leask, Nanda 2024; SAE_REFERENCE.md §4).

Training keeps the k*B largest ReLU pre-activations over the flattened batch (per-token L0 varies;
its mean is k). Inference uses one global threshold theta instead, f = a * 1[a > theta], so a
token's latents do not depend on the rest of its batch.

theta is a float32 buffer, 0 until estimated. `estimate_threshold` (called by the trainer after
each training step from `training.threshold_start_step` on) sets it to the smallest positive kept
activation of the batch the first time, then follows an EMA with momentum `threshold_momentum`.
Starting from the first observation rather than from 0 avoids a long bias towards 0 in short runs.
After training, `calibrate` replaces the EMA by the final weights' own cut-off: the running estimate
lags while pre-activations shrink (on the default cache theta 1.45 against a cut-off of 1.19,
inference L0 15.6 instead of k = 32), so theta becomes the mean smallest kept activation of the
final model's batch-level selection over a few training batches.

Data parallelism (through `self.collective`, see sae/collective.py): the training selection is the
global batch's top k*B (each rank proposes its own top k*B candidates, the candidates' values are
gathered, the k*B-th largest is the cut-off), and the threshold estimate takes the minimum over
ranks, so theta is the same everywhere. Calibration runs on one process over the rows a single
process would read, with the local selection.

If theta was never estimated, eval mode falls back to per-token TopK with k (still independent of
the batch) and warns once: an untrained or freshly initialised model stays usable and the
fallback is visible.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from sae.base import SAEConfig
from sae.collective import LOCAL
from sae.registry import register
from sae.selection import (
    Selection,
    encode_batch_topk,
    select_batch_topk,
    select_global_batch_topk,
    select_threshold,
    select_topk,
)
from sae.topk import TopKSAE


@register("BatchTopKSAE", "batchtopk")
class BatchTopKSAE(TopKSAE):
    threshold: Tensor  # buffer [], float32: the inference threshold theta
    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float32))
        self._warned_no_threshold = False

    def select(self, z: Tensor) -> Selection:
        # On z rather than ReLU(z), saving a [B, d_sae] pass: the kept values go through ReLU
        # anyway, so the two can differ only in which zero-valued entries are kept; theta > 0.
        if self.training:
            if self.collective.world > 1:
                return select_global_batch_topk(z, self.cfg.k, self.collective)
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

    def _fused_select(self, x_c: Tensor) -> Selection | None:
        """Training's local batch-level selection without z (`encode_batch_topk`); the global one under
        data parallelism, and inference, keep z."""
        if type(self).select is not BatchTopKSAE.select or not self.training or self.collective.world > 1:
            return None
        return encode_batch_topk(x_c, self.W_enc, self.b_enc, self.cfg.k)

    @torch.no_grad()
    def estimate_threshold(self, out: dict[str, Tensor]) -> None:
        """EMA of the smallest positive kept activation of the (global) batch; training mode only."""
        if not self.training:
            return
        vals = out["sel_val"].detach().float()
        # Tensor ops only, no host sync: inf marks "no positive kept value in this batch".
        low = torch.where(vals > 0, vals, torch.full_like(vals, float("inf"))).min() if vals.numel() \
            else vals.new_tensor(float("inf"))
        if self.collective.world > 1:
            low = self.collective.all_min(low.reshape(1).clone()).reshape(())
        elif vals.numel() == 0:
            return
        m = self.cfg.threshold_momentum
        theta = self.threshold
        ema = torch.where(theta == 0, low, m * theta + (1.0 - m) * low)
        self.threshold.copy_(torch.where(torch.isinf(low), theta, ema))

    @torch.no_grad()
    def calibrate(self, batches: Iterable[Tensor]) -> dict[str, float] | None:
        """theta := the mean smallest kept activation of the training-mode (batch-level) selection
        over `batches` (raw x), so that inference keeps about k latents per token on the training
        distribution. -> {before, after, batches}, or None when no batch kept a positive value."""
        was_training, collective = self.training, self.collective
        self.train()  # the batch-level selection whose cut-off inference should reproduce
        self.collective = LOCAL  # one process, the rows a single process would read
        cuts = []
        try:
            for x in batches:
                vals = self(x, dense_acts=False)["sel_val"].float()
                vals = vals[vals > 0]
                if vals.numel():
                    cuts.append(vals.min())
        finally:
            self.train(was_training)
            self.collective = collective
        if not cuts:
            return None
        before = float(self.threshold)
        self.threshold.fill_(torch.stack(cuts).mean())
        return {"before": before, "after": float(self.threshold), "batches": len(cuts)}

    def to_saelens(self) -> tuple[str, dict[str, Tensor], dict[str, Any]]:
        """SAELens "jumprelu" with every threshold = theta: exactly the inference rule ReLU(z) 1[z > theta]."""
        theta = float(self.threshold)
        if not theta > 0:
            raise ValueError(f"{type(self).type_name}'s inference threshold was never estimated (it is {theta}); it "
                             "cannot be written as a JumpReLU: train longer than training.threshold_start_step")
        p = self._saelens_folded(transpose=True)
        tensors = {k: p[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
        return "jumprelu", {**tensors, "threshold": torch.full((self.d_sae,), theta)}, {}

    def _apply(self, fn, recurse=True):
        # theta stays float32 even when the model is cast to a low-precision dtype: an EMA with
        # momentum 0.99 stalls in bf16.
        super()._apply(fn, recurse)
        if self.threshold.dtype != torch.float32:
            self.threshold = self.threshold.float()
        return self
