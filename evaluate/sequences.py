"""Rebuild held-out model inputs from the token ids the cache stores.

The cache keeps one row per token with its `sequence` and `position`; special tokens (BOS, CLS,
SEP, EOS) went through the model but are left out by default. So a sequence is rebuilt by placing
each stored token at its position and putting the tokenizer's special tokens back: its leading
specials at the first positions, its trailing specials after the last stored row, and any other
gap (the separator harvest puts between packed documents) filled with the separator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class Specials:
    """Token ids the producer put around each packed piece (harvest.tokenization.SpecialLayout):
    `prefix` (e.g. [CLS] or BOS), `suffix` (e.g. [SEP]), `separator` between documents (EOS, else
    SEP, else None), and `pad` for right padding (masked out)."""

    prefix: list[int]
    suffix: list[int]
    separator: int | None = None
    pad: int = 0

    @classmethod
    def from_layout(cls, layout: Any, pad: int = 0) -> Specials:
        """From a harvest `SpecialLayout` (or the cache metadata's tokenizer dict with the same keys)."""
        get: Any = layout.get if isinstance(layout, dict) else lambda k: getattr(layout, k)
        return cls(prefix=[int(t) for t in get("prefix")], suffix=[int(t) for t in get("suffix")],
                   separator=None if get("separator") is None else int(get("separator")), pad=int(pad))


def gather_rows(token_ids: Tensor, sequence: Tensor, position: Tensor, n_sequences: int) -> dict[int, Tensor]:
    """Rows of the first `n_sequences` sequence ids (in id order) -> {sequence id: [n_i, 2] (position,
    token id) sorted by position}. Inputs: [n] each, e.g. concatenated over the held-out shards."""
    ids = torch.unique(sequence)[:n_sequences]
    out = {}
    for s in ids.tolist():
        sel = sequence == s
        pos, tok = position[sel].long(), token_ids[sel].long()
        order = pos.argsort()
        out[int(s)] = torch.stack([pos[order], tok[order]], dim=1)
    return out


def build_batch(rows: list[Tensor], specials: Specials) -> tuple[Tensor, Tensor, Tensor]:
    """rows: per sequence [n_i, 2] (position, token id) -> (input_ids [S, T], attention_mask [S, T],
    stored [S, T] bool: positions whose row is in the cache, i.e. where the SAE may be spliced).
    Sequences are right-padded to the longest."""
    built = [_one(r, specials) for r in rows]
    t = max(len(ids) for ids, _ in built)
    input_ids = torch.full((len(built), t), specials.pad, dtype=torch.long)
    attention = torch.zeros(len(built), t, dtype=torch.long)
    stored = torch.zeros(len(built), t, dtype=torch.bool)
    for i, (ids, st) in enumerate(built):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        stored[i, : len(ids)] = torch.tensor(st)
    return input_ids, attention, stored


def _one(rows: Tensor, specials: Specials) -> tuple[list[int], list[bool]]:
    pos = rows[:, 0].tolist()
    tok = rows[:, 1].tolist()
    length = pos[-1] + 1
    gap = specials.separator if specials.separator is not None else specials.pad
    ids = [specials.prefix[p] if p < len(specials.prefix) else gap for p in range(length)]
    stored = [False] * length
    for p, t in zip(pos, tok, strict=True):
        ids[p] = t
        stored[p] = True
    # Trailing specials: add them unless the cache kept them (its last row is already one).
    if specials.suffix and tok[-1] != specials.suffix[-1]:
        ids += specials.suffix
        stored += [False] * len(specials.suffix)
    return ids, stored
