"""Downstream fidelity: rerun the language model with an SAE's reconstruction in place of the
residual stream at a block (a forward hook), on held-out sequences rebuilt from stored token ids.

- Causal LMs: next-token CE clean, spliced and zero-ablated; CE loss score
  (CE_zero - CE_sae) / (CE_zero - CE_clean); KL(clean || spliced) averaged PER TOKEN. (The
  RouteSAE paper's KL figures are sums over 512-token sequences: multiply by the sequence length
  before comparing.)
- Encoders (BERT-like, e.g. MiniLM): cosine of the mean-pooled final embedding, clean against
  spliced and against zero-ablated, averaged over sequences.
- Only positions marked in `splice_mask` are replaced (rows that are in the cache: special
  tokens were never seen by the SAE, so they stay clean).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae import BaseSAE

# A replacement: (block number, hidden [n, d] at the selected positions) -> new hidden [n, d].
Replace = Callable[[int, Tensor], Tensor]


@contextmanager
def splice(blocks: nn.ModuleList, masks: dict[int, Tensor], replace: Replace) -> Iterator[None]:
    """While active, the output of `blocks[L]` (hidden [B, T, d]) is replaced at the positions
    where `masks[L]` ([B, T] bool) is True by `replace(L, hidden[mask])`; everything else passes
    through untouched. Hooks are removed on exit, also on error."""
    handles = []

    def make_hook(layer: int):
        def hook(module: nn.Module, args: object, output: Any) -> Any:
            hidden = output[0] if isinstance(output, tuple | list) else output
            mask = masks[layer].to(hidden.device)
            if not bool(mask.any()):
                return output
            new = hidden.clone()
            new[mask] = replace(layer, hidden[mask]).to(hidden.dtype)
            if isinstance(output, tuple | list):
                return (new, *output[1:])
            return new

        return hook

    try:
        for layer in masks:
            handles.append(blocks[layer].register_forward_hook(make_hook(layer)))
        yield
    finally:
        for h in handles:
            h.remove()


def zero_replace(layer: int, hidden: Tensor) -> Tensor:
    """Zero ablation."""
    return torch.zeros_like(hidden)


def sae_replace(sae: BaseSAE) -> Replace:
    """A single-layer SAE: raw activation in, raw reconstruction out (`BaseSAE.reconstruct`)."""
    def replace(layer: int, hidden: Tensor) -> Tensor:
        p = next(sae.parameters())
        return sae.reconstruct(hidden.to(p.device, p.dtype)).to(hidden.device)

    return replace


def _logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.logits.float()


class CausalFidelity:
    """Accumulates next-token CE (clean, spliced, zero-ablated) and KL(clean || spliced) over batches."""

    def __init__(self) -> None:
        self.tokens = 0
        self.ce = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
        self.kl = 0.0

    @torch.no_grad()
    def update(self, model: nn.Module, blocks: nn.ModuleList, masks: dict[int, Tensor], replace: Replace,
               input_ids: Tensor, attention_mask: Tensor) -> None:
        """input_ids, attention_mask: [B, T]; masks: block -> [B, T] bool positions to splice."""
        # A prediction at t counts when both t and its target t+1 are real tokens.
        valid = (attention_mask[:, :-1] * attention_mask[:, 1:]).bool()
        targets = input_ids[:, 1:][valid]
        clean = _logits(model, input_ids, attention_mask)[:, :-1][valid]
        with splice(blocks, masks, replace):
            spliced = _logits(model, input_ids, attention_mask)[:, :-1][valid]
        with splice(blocks, masks, zero_replace):
            zero = _logits(model, input_ids, attention_mask)[:, :-1][valid]
        for name, logits in (("clean", clean), ("sae", spliced), ("zero", zero)):
            self.ce[name] += float(F.cross_entropy(logits, targets, reduction="sum"))
        logp, logq = clean.log_softmax(-1), spliced.log_softmax(-1)
        self.kl += float((logp.exp() * (logp - logq)).sum())
        self.tokens += int(targets.numel())

    def result(self) -> dict[str, float | int | str | None]:
        if self.tokens == 0:
            raise ValueError("no next-token predictions were made: the held-out sequences are too short")
        n = self.tokens
        ce = {k: v / n for k, v in self.ce.items()}
        out: dict[str, float | int | str | None] = {
            "ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_zero": ce["zero"],
            "ce_loss_score": ce_loss_score(ce["clean"], ce["sae"], ce["zero"]),
            "kl_per_token": self.kl / n, "predicted_tokens": n}
        if out["ce_loss_score"] is None:  # eval.json says why beside the null (issue 17)
            out["ce_loss_score_reason"] = (f"zero ablation changes the CE by only {ce['zero'] - ce['clean']:.2e} "
                                           f"nats, the score's denominator: the ratio means nothing")
        return out


def ce_loss_score(ce_clean: float, ce_sae: float, ce_zero: float, eps: float = 1e-4) -> float | None:
    """(CE_zero - CE_sae) / (CE_zero - CE_clean): 1 when the splice is harmless, 0 when it is as bad
    as zero ablation. None (with a warning) when zero ablation barely changes the loss, where the
    ratio means nothing."""
    denom = ce_zero - ce_clean
    if abs(denom) < eps or not math.isfinite(denom):
        warnings.warn(f"CE loss score undefined: zero ablation changes the CE by only {denom:.2e} nats "
                      f"(clean {ce_clean:.4f}, zero-ablated {ce_zero:.4f})", stacklevel=2)
        return None
    return (ce_zero - ce_sae) / denom


def _pooled(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean-pooled final hidden state over real tokens (sentence-transformers' pooling): [B, d]."""
    hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()
    m = attention_mask.to(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class EncoderFidelity:
    """Accumulates the cosine of the pooled embedding, clean vs spliced and clean vs zero-ablated."""

    def __init__(self) -> None:
        self.sequences = 0
        self.cos = {"sae": 0.0, "zero": 0.0}

    @torch.no_grad()
    def update(self, model: nn.Module, blocks: nn.ModuleList, masks: dict[int, Tensor], replace: Replace,
               input_ids: Tensor, attention_mask: Tensor) -> None:
        """input_ids, attention_mask: [B, T]; masks: block -> [B, T] bool positions to splice."""
        clean = _pooled(model, input_ids, attention_mask)
        for name, fn in (("sae", replace), ("zero", zero_replace)):
            with splice(blocks, masks, fn):
                other = _pooled(model, input_ids, attention_mask)
            self.cos[name] += float(F.cosine_similarity(clean, other, dim=-1).sum())
        self.sequences += int(input_ids.shape[0])

    def result(self) -> dict[str, float | int]:
        if self.sequences == 0:
            raise ValueError("no held-out sequences were rerun")
        n = self.sequences
        return {"embedding_cos_sae": self.cos["sae"] / n, "embedding_cos_zero": self.cos["zero"] / n,
                "sequences": n}
