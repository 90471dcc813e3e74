"""Rebuilding model inputs from stored rows puts special tokens back where harvest put them."""

import torch

from evaluate.sequences import Specials, build_batch, gather_rows

CLS, SEP, PAD = 101, 102, 0


def test_rebuild_bert_like_sequences():
    # sequence 7: [CLS] 5 6 [SEP-separator] 8 [SEP]; sequence 3: [CLS] 9 [SEP]; rows shuffled, specials absent
    token_ids = torch.tensor([8, 9, 5, 6, 42])
    sequence = torch.tensor([7, 3, 7, 7, 11])
    position = torch.tensor([4, 1, 1, 2, 1])
    rows = gather_rows(token_ids, sequence, position, n_sequences=2)
    assert list(rows) == [3, 7]  # the first two sequence ids, in id order; 11 is left out
    ids, attn, stored = build_batch(list(rows.values()), Specials([CLS], [SEP], separator=SEP, pad=PAD))
    assert ids.tolist() == [[CLS, 9, SEP, PAD, PAD, PAD], [CLS, 5, 6, SEP, 8, SEP]]
    assert attn.tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]
    assert stored.tolist() == [[False, True, False, False, False, False],
                               [False, True, True, False, True, False]]


def test_kept_specials_are_not_doubled():
    rows = torch.tensor([[0, CLS], [1, 9], [2, SEP]])
    ids, _, stored = build_batch([rows], Specials([CLS], [SEP], separator=SEP))
    assert ids.tolist() == [[CLS, 9, SEP]]
    assert stored.tolist() == [[True, True, True]]


def test_bos_only_layout():
    rows = torch.tensor([[1, 4], [2, 5]])
    ids, _, stored = build_batch([rows], Specials([50], [], separator=51))
    assert ids.tolist() == [[50, 4, 5]] and stored.tolist() == [[False, True, True]]
