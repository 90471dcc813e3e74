"""Downstream fidelity on held-out sequences: gather their stored token ids, rebuild the model
inputs (evaluate.sequences), and rerun the model clean, spliced and zero-ablated (evaluate.splice).

A single-layer SAE is spliced at its block on every stored position. A routed SAE splices each
token at the layer its router picks on the clean pass, once (the RouteSAE paper, section 3.2); the
replacement is computed by the hook from the activation it sees then.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from cache import Cache
from evaluate.sequences import Specials, build_batch, gather_rows
from evaluate.splice import CausalFidelity, EncoderFidelity, Replace, sae_replace
from harvest.model import LoadedModel
from sae import BaseSAE

SPLIT = "heldout"


def heldout_tokens(cache: Cache, split: str = SPLIT) -> dict[str, Tensor]:
    """token_ids, sequence, position of every row of `split`, concatenated over shards ([n] each)."""
    parts: dict[str, list[Tensor]] = {"token_ids": [], "sequence": [], "position": []}
    for info in cache.shards(split):
        t = cache.read_tokens(split, info.index)
        for k in parts:
            parts[k].append(t[k])
    if not parts["token_ids"]:
        raise ValueError(f"the cache at {cache.path} has no {split} rows: harvest with data.heldout_fraction > 0")
    return {k: torch.cat(v) for k, v in parts.items()}


@torch.no_grad()
def downstream_fidelity(lm: LoadedModel, sae: BaseSAE, cache: Cache, specials: Specials, *, n_sequences: int = 64,
                        batch_sequences: int = 8) -> dict:
    """`lm`: a harvest.model.LoadedModel (model, blocks, causal, device). Returns CE/KL metrics for
    causal LMs or pooled-embedding cosines for encoders, plus how many sequences were rerun."""
    sae.eval()
    layers = list(sae.cfg.layers)
    tokens = heldout_tokens(cache)
    rows = list(gather_rows(tokens["token_ids"], tokens["sequence"], tokens["position"], n_sequences).values())
    acc = CausalFidelity() if lm.causal else EncoderFidelity()
    for i in range(0, len(rows), batch_sequences):
        input_ids, attention, stored = build_batch(rows[i:i + batch_sequences], specials)
        input_ids, attention, stored = input_ids.to(lm.device), attention.to(lm.device), stored.to(lm.device)
        if len(layers) == 1:
            masks, replace = {layers[0]: stored}, sae_replace(sae)
        else:
            masks, replace = routed_masks(lm, sae, layers, input_ids, attention, stored)
        acc.update(lm.model, lm.blocks, masks, replace, input_ids, attention)
    out: dict[str, Any] = dict(acc.result())
    out["kind"] = "causal" if lm.causal else "encoder"
    out["layers"] = layers
    if lm.causal:
        out["kl_note"] = "KL(clean || spliced) per predicted token; the RouteSAE paper's KL is a sum per sequence"
    return out


def routed_masks(lm: LoadedModel, sae: Any, layers: list[int], input_ids: Tensor, attention: Tensor,
                 stored: Tensor) -> tuple[dict[int, Tensor], Replace]:
    # `sae` is routed (`sae.routed`): it has reconstruct_routed and the shared SAE's _forward_normalised.
    """Clean pass -> the router's layer per token -> ({block: [B, T] bool}, replacement), so that
    each stored token is spliced at its routed block only."""
    from harvest.model import block_hooks

    hidden: dict[int, Tensor] = {}
    with block_hooks(lm.blocks, layers, lambda layer, h: hidden.__setitem__(layer, h), stop_early=False):
        lm.model(input_ids=input_ids, attention_mask=attention)
    stacked = torch.stack([hidden[layer] for layer in layers], dim=2)  # [B, T, n_layers, d]
    p = next(sae.parameters())
    _, chosen = sae.reconstruct_routed(stacked[stored].to(p.device, p.dtype))  # [n] index into layers
    chosen = chosen.to(stored.device)
    masks = {}
    for j, layer in enumerate(layers):
        m = torch.zeros_like(stored)
        m[stored] = chosen == j
        masks[layer] = m

    def replace(layer: int, h: Tensor) -> Tensor:
        # The shared SAE on this layer's own activation as the hook sees it (unscaled by p), in the
        # layer's raw units: what RouteSAE's reconstruct_routed does for the chosen layer.
        scale = sae.input_scale[layers.index(layer)].to(p.dtype)
        out = sae._forward_normalised(h.to(p.device, p.dtype) * scale, dense_acts=False)["sae_out"]
        return (out / scale).to(h.device)

    return masks, replace
