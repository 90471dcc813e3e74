"""harvest.windows + harvest.capture on a fake model whose block outputs spell out which token they
belong to, so the row bookkeeping (batching, padding, selection, shuffle, resume offsets) is checked
against facts, not against the code's own arithmetic."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harvest.capture import WindowSink, compute_window
from harvest.model import LoadedModel
from harvest.text import PackedSequence
from harvest.windows import group_windows, plan_window, window_permutation


class _Block(nn.Module):
    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor]:
        return (h + torch.tensor([0.0, 0.0, 1.0]),)  # channel 2 counts the blocks run


class _Fake(nn.Module):
    """Embeds token t at position p as [t, p, 0]; each block adds 1 to the last channel."""

    def __init__(self, n_blocks: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Block() for _ in range(n_blocks)])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        b, t = input_ids.shape
        h = torch.stack([input_ids.float(), torch.arange(t).float().expand(b, t), torch.zeros(b, t)], dim=-1)
        for block in self.layers:
            h = block(h)[0]
        return h


def _lm(n_blocks: int = 4) -> LoadedModel:
    model = _Fake(n_blocks)
    return LoadedModel(model=model, config=None, path="fake", blocks=model.layers, block_path="layers",
                       n_blocks=n_blocks, d_model=3, dtype=torch.float32, device=torch.device("cpu"), causal=False)


def _seq(split: str, index: int, length: int, doc: int) -> PackedSequence:
    ids = torch.arange(length, dtype=torch.int64) + 100 * index + 10_000 * (split == "heldout")
    keep = torch.ones(length, dtype=torch.bool)
    keep[0] = False  # a BOS-like token that runs through the model but is not cached
    return PackedSequence(split, index, ids, torch.full((length,), doc, dtype=torch.int64), keep)


def test_permutation_depends_only_on_seed_split_chunk():
    a = window_permutation(50, 0, "train", 8)
    assert torch.equal(a, window_permutation(50, 0, "train", 8))
    assert sorted(a.tolist()) == list(range(50))
    others = [window_permutation(50, 1, "train", 8), window_permutation(50, 0, "heldout", 8),
              window_permutation(50, 0, "train", 12)]
    assert all(not torch.equal(a, o) for o in others)


def test_group_windows_anchors_and_skips():
    stream = [_seq("train", i, 5, i) for i in range(7)]
    stream.insert(3, _seq("heldout", 0, 5, 99))
    got = [(s, c, [q.index for q in seqs]) for s, c, seqs in group_windows(stream, 3, {"train": 2, "heldout": 0})]
    assert got == [("train", 2, [2, 3, 4]), ("train", 5, [5, 6]), ("heldout", 0, [0])]


def test_group_windows_refuses_a_gap():
    stream = [_seq("train", 0, 5, 0), _seq("train", 2, 5, 1)]
    with pytest.raises(RuntimeError, match="skipped from train sequence 1 to 2"):
        list(group_windows(stream, 4, {"train": 0, "heldout": 0}))


@pytest.mark.parametrize("store", [torch.float32, torch.bfloat16])
def test_window_rows_are_the_kept_tokens_shuffled(store):
    lm = _lm()
    seqs = [_seq("train", 8 + i, n, doc=i // 2) for i, n in enumerate([6, 6, 3, 6, 2])]  # padding in 2 batches
    plan = plan_window("train", 8, seqs, batch_size=2, seed=3, pad_id=7)
    assert [tuple(b.input_ids.shape) for b in plan.batches] == [(2, 6), (2, 6), (1, 2)]
    acts = compute_window(lm, [1, 3], plan, store)
    assert plan.rows == sum(n - 1 for n in [6, 6, 3, 6, 2])
    expected = {(s.index, p): (int(s.input_ids[p]), int(s.document[p]))
                for s in seqs for p in range(1, len(s.input_ids))}
    got = {(int(q), int(p)): (int(t), int(d)) for q, p, t, d in
           zip(plan.sequence, plan.position, plan.token_ids, plan.document, strict=True)}
    assert got == expected  # every kept token once; no padding, no BOS
    for layer, buf in acts.items():
        assert buf.dtype == store and buf.shape == (plan.rows, 3)
        assert torch.equal(buf[:, 0], plan.token_ids.to(store))  # the activation row is the metadata's token
        assert torch.equal(buf[:, 1], plan.position.to(store))
        assert torch.all(buf[:, 2] == layer + 1)  # output of block `layer`
    assert not torch.equal(plan.position, plan.position.sort().values)  # shuffled


class _Recorder:
    def __init__(self) -> None:
        self.calls = []

    def append(self, split, *, chunk, offset, acts, token_ids, sequence, position, document, copy=True):
        self.calls.append((split, chunk, offset, {k: v.clone() for k, v in acts.items()}, token_ids.clone()))


def test_sink_appends_from_the_resume_offset():
    lm = _lm()
    seqs = [_seq("heldout", i, 5, i) for i in range(3)]
    plan = plan_window("heldout", 0, seqs, batch_size=4, seed=0, pad_id=0)
    acts = compute_window(lm, [0], plan, torch.float32)
    rec = _Recorder()
    sink = WindowSink(rec, torch.device("cpu"))
    sink.submit(plan, acts, 5)
    sink.submit(plan, acts, plan.rows)  # everything already committed: nothing to append
    sink.close()
    assert len(rec.calls) == 1
    split, chunk, offset, got, tokens = rec.calls[0]
    assert (split, chunk, offset) == ("heldout", 0, 5)
    assert torch.equal(got[0], acts[0][5:]) and torch.equal(tokens, plan.token_ids[5:])
