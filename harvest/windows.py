"""Shuffle windows: group packed sequences, plan their forward batches and the rows' shuffled order.

A window is `shuffle_window` consecutive sequences of one split; its chunk id (the cache writer's
resume cursor) is the split index of its first sequence. Its rows (kept tokens, padding never
included) are numbered sequence by sequence, position by position, then permuted by a generator
seeded from (seed, split, chunk id) alone, so recomputing a window after a crash gives the same
rows in the same order. Everything here is CPU-side bookkeeping; no model is involved.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

SPLIT_CODES = {"train": 0, "heldout": 1}


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] int64, right-padded with the pad id
    attention_mask: torch.Tensor  # [B, T] int64, 0 on padding
    src: torch.Tensor  # [m] int64: flat indices into the B*T positions of the rows kept
    dest: torch.Tensor  # [m] int64: where those rows go in the window's (shuffled) row order


@dataclass
class WindowPlan:
    split: str
    chunk: int  # split index of the window's first sequence
    n_sequences: int
    batches: list[Batch]
    # Per-row metadata in the shuffled order, each [n] (n = rows the window contributes):
    token_ids: torch.Tensor  # int32
    sequence: torch.Tensor  # int64, split index of the row's sequence
    position: torch.Tensor  # int32, position within the sequence (special tokens counted)
    document: torch.Tensor  # int64

    @property
    def rows(self) -> int:
        return int(self.token_ids.shape[0])


def window_permutation(n: int, seed: int, split: str, chunk: int) -> torch.Tensor:
    """[n] int64: shuffled row j of the window is unshuffled row perm[j]. Depends only on the arguments."""
    rng = np.random.default_rng([int(seed), SPLIT_CODES[split], int(chunk)])
    return torch.from_numpy(rng.permutation(n).astype(np.int64))


def group_windows(sequences: Iterable, window: int, first: dict[str, int]) -> Iterator[tuple[str, int, list]]:
    """Group a stream of PackedSequence (both splits interleaved, each split in index order) into
    windows of `window` sequences per split, anchored at `first[split]`: windows start at
    first, first+window, ... Sequences before `first[split]` are skipped. Yields (split, chunk, sequences);
    each split's last window may be short."""
    pending: dict[str, list] = {s: [] for s in first}
    starts = dict(first)
    expected = dict(first)
    for seq in sequences:
        split = seq.split
        if split not in pending:
            raise ValueError(f"packed sequence has unknown split {split!r}")
        if seq.index < first[split]:
            continue
        if seq.index != expected[split]:
            raise RuntimeError(f"text stream skipped from {split} sequence {expected[split]} to {seq.index}")
        expected[split] += 1
        pending[split].append(seq)
        if len(pending[split]) == window:
            yield split, starts[split], pending[split]
            starts[split] += window
            pending[split] = []
    for split, seqs in pending.items():
        if seqs:
            yield split, starts[split], seqs


def plan_window(split: str, chunk: int, sequences: list, *, batch_size: int, seed: int,
                pad_id: int) -> WindowPlan:
    """Batches (right-padded, attention mask) and the shuffled row order of one window."""
    keeps = [seq.keep.to(torch.bool) for seq in sequences]
    counts = [int(k.sum()) for k in keeps]
    n = sum(counts)
    perm = window_permutation(n, seed, split, chunk)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(n, dtype=torch.int64)

    token_ids, seq_idx, positions, documents = [], [], [], []
    for seq, keep in zip(sequences, keeps, strict=True):
        where = keep.nonzero().squeeze(1)
        token_ids.append(seq.input_ids[where])
        positions.append(where)
        documents.append(seq.document[where])
        seq_idx.append(torch.full((where.numel(),), seq.index, dtype=torch.int64))

    batches = []
    row = 0
    for b0 in range(0, len(sequences), batch_size):
        group = sequences[b0:b0 + batch_size]
        width = max(int(s.input_ids.shape[0]) for s in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.int64)
        mask = torch.zeros((len(group), width), dtype=torch.int64)
        kept = torch.zeros((len(group), width), dtype=torch.bool)
        for i, seq in enumerate(group):
            t = int(seq.input_ids.shape[0])
            ids[i, :t] = seq.input_ids
            mask[i, :t] = 1
            kept[i, :t] = keeps[b0 + i]
        src = kept.flatten().nonzero().squeeze(1)
        batches.append(Batch(ids, mask, src, inverse[row:row + src.numel()]))
        row += src.numel()

    def shuffled(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        flat = torch.cat(parts).to(dtype) if parts else torch.empty(0, dtype=dtype)
        return flat[perm]

    return WindowPlan(
        split=split, chunk=chunk, n_sequences=len(sequences), batches=batches,
        token_ids=shuffled(token_ids, torch.int32), sequence=shuffled(seq_idx, torch.int64),
        position=shuffled(positions, torch.int32), document=shuffled(documents, torch.int64))
