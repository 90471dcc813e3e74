"""Documents -> held-out split -> tokens -> packed sequences of at most `max_length` tokens.

The rule:
- Each document goes to "heldout" when a hash of (seed, document index) falls under
  `heldout_fraction`, else to "train": a per-document decision, the same however the documents
  are divided between processes.
- Each split has its own token stream: documents tokenized without special tokens (special-token
  strings inside the text are split as plain text, so a document cannot inject control tokens),
  joined in order with the tokenizer's separator (EOS, else SEP, else nothing) between them.
- The stream is cut into pieces of `max_length - len(prefix) - len(suffix)` tokens and each piece
  wrapped with the model's special tokens (tokenization.special_layout: [CLS] … [SEP] for BERT,
  BOS for Llama and GPT-2, nothing for Qwen). The last piece of a stream may be shorter.
- `keep` is False at the tokens packing inserted (wrap and separators) unless keep_special_tokens;
  real text tokens, [UNK] included, are always kept.
- `max_tokens` counts kept tokens over both splits, from the first sequence of the stream (those
  skipped through `start` included, so a resumed run stops where an uninterrupted one does); the
  sequence that crosses the budget is shortened (and rewrapped) so that the total is exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import xxhash
from transformers import PreTrainedTokenizerBase

from cache.names import SPLITS
from harvest.errors import TextError
from harvest.sources import iter_documents
from harvest.tokenization import SpecialLayout, special_layout

PACKING_VERSION = 1  # bump when the rule above changes: it enters packing_identity
_TOKENIZE_BATCH_DOCS = 64
_TOKENIZE_BATCH_CHARS = 1 << 20


@dataclass
class PackedSequence:
    """One packed sequence, ready for the model."""

    split: str  # "train" | "heldout"
    index: int  # sequence index within its split: 0, 1, 2, ... in stream order
    input_ids: torch.Tensor  # [T] int64, T <= max_length, special tokens included
    document: torch.Tensor  # [T] int64: global document index of each token (a separator: the document it ends;
    #                          the wrap: the document of the text token next to it)
    keep: torch.Tensor  # [T] bool: rows that go into the cache

    @property
    def n_kept(self) -> int:
        return int(self.keep.sum())


def split_of(doc_index: int, seed: int, heldout_fraction: float) -> str:
    """"heldout" or "train" for one document, from xxh3_64 of "seed:index" as a uniform in [0, 1)."""
    u = xxhash.xxh3_64_intdigest(f"{seed}:{doc_index}".encode()) / 2.0**64
    return "heldout" if u < heldout_fraction else "train"


def packing_identity(data_cfg: Any, tokenizer: PreTrainedTokenizerBase, keep_special_tokens: bool) -> dict:
    """The packing choices that decide which tokens land in which sequence (for the cache's
    identity): rule version, sequence length, split rule, special tokens."""
    layout = special_layout(tokenizer)
    return {"packing_version": PACKING_VERSION, "max_length": data_cfg.max_length, "seed": data_cfg.seed,
            "heldout_fraction": data_cfg.heldout_fraction, "split_hash": "xxh3_64(f'{seed}:{document}')",
            "prefix": list(layout.prefix), "suffix": list(layout.suffix), "separator": layout.separator,
            "keep_special_tokens": keep_special_tokens}


def packed_sequences(data_cfg: Any, tokenizer: PreTrainedTokenizerBase, *, keep_special_tokens: bool,
                     max_tokens: int | None, start: dict[str, int] | None = None,
                     doc_filter: Callable[[int], bool] | None = None) -> Iterator[PackedSequence]:
    """Both splits' sequences, interleaved in document order (see the module docstring).

    start: per split, the index of the first sequence to yield (earlier ones are packed and
    counted against max_tokens, but not yielded). doc_filter: pack only the documents whose index
    it accepts (splits are decided per document, so they do not depend on it)."""
    layout = special_layout(tokenizer)
    _check(data_cfg, tokenizer, layout, max_tokens)
    start = start or {}
    piece_len = data_cfg.max_length - layout.n_special
    packers = {s: _Packer(s, layout, piece_len, keep_special_tokens) for s in SPLITS}
    budget = _Budget(max_tokens)
    produced = 0
    for seq in _pieces(data_cfg, tokenizer, packers, doc_filter):
        produced += 1
        seq = budget.take(seq, packers[seq.split])
        if seq.index >= start.get(seq.split, 0):
            yield seq
        if budget.spent:
            return
    if produced == 0:
        raise TextError(f"the documents of {data_cfg.train_path} tokenize to no tokens; point data.train_path at "
                        "a corpus with text")


def _pieces(data_cfg: Any, tokenizer: PreTrainedTokenizerBase, packers: dict[str, _Packer],
            doc_filter: Callable[[int], bool] | None) -> Iterator[PackedSequence]:
    """Every split's wrapped pieces as documents arrive, then each split's short tail."""
    for doc_index, ids in _tokenized(data_cfg, tokenizer, doc_filter):
        yield from packers[split_of(doc_index, data_cfg.seed, data_cfg.heldout_fraction)].add(doc_index, ids)
    for packer in packers.values():
        yield from packer.finish()


class _Packer:
    """One split's token stream, cut into wrapped pieces."""

    def __init__(self, split: str, layout: SpecialLayout, piece_len: int, keep_special: bool):
        self.split, self.layout, self.piece_len, self.keep_special = split, layout, piece_len, keep_special
        self.ids: list[int] = []  # the stream's unemitted tail
        self.docs: list[int] = []
        self.special: list[bool] = []
        self.last_doc: int | None = None
        self.next_index = 0

    def add(self, doc: int, ids: list[int]) -> Iterator[PackedSequence]:
        if self.last_doc is not None and self.layout.separator is not None:
            # The separator ends the previous document (EOS semantics), so it carries that index.
            self.ids.append(self.layout.separator)
            self.docs.append(self.last_doc)
            self.special.append(True)
        self.ids += ids
        self.docs += [doc] * len(ids)
        self.special += [False] * len(ids)
        self.last_doc = doc
        full = len(self.ids) // self.piece_len * self.piece_len
        for at in range(0, full, self.piece_len):
            yield self.wrap(self.ids[at:at + self.piece_len], self.docs[at:at + self.piece_len],
                            self.special[at:at + self.piece_len])
        del self.ids[:full], self.docs[:full], self.special[:full]

    def finish(self) -> Iterator[PackedSequence]:
        if self.ids:
            yield self.wrap(self.ids, self.docs, self.special)
        self.ids, self.docs, self.special = [], [], []

    def wrap(self, ids: list[int], docs: list[int], special: list[bool], index: int | None = None) -> PackedSequence:
        """Prefix + piece + suffix; the wrap tokens take the document of the piece's end they touch."""
        pre, suf = self.layout.prefix, self.layout.suffix
        all_ids = [*pre, *ids, *suf]
        all_docs = [docs[0]] * len(pre) + docs + [docs[-1]] * len(suf)
        is_special = torch.tensor([True] * len(pre) + special + [True] * len(suf), dtype=torch.bool)
        keep = torch.ones_like(is_special) if self.keep_special else ~is_special
        if index is None:
            index, self.next_index = self.next_index, self.next_index + 1
        return PackedSequence(self.split, index, torch.tensor(all_ids, dtype=torch.int64),
                              torch.tensor(all_docs, dtype=torch.int64), keep)


class _Budget:
    """Counts kept tokens and shortens the sequence that crosses max_tokens."""

    def __init__(self, max_tokens: int | None):
        self.left = max_tokens
        self.spent = False

    def take(self, seq: PackedSequence, packer: _Packer) -> PackedSequence:
        if self.left is None:
            return seq
        n = seq.n_kept
        if n >= self.left:
            seq = _shorten(seq, packer, self.left) if n > self.left else seq
            self.spent = True
        self.left -= seq.n_kept
        return seq


def _shorten(seq: PackedSequence, packer: _Packer, kept: int) -> PackedSequence:
    """`seq` cut so that exactly `kept` of its tokens are kept, rewrapped when the cut leaves text."""
    pre, suf = len(packer.layout.prefix), len(packer.layout.suffix)
    body = slice(pre, len(seq.input_ids) - suf)
    ids, docs = seq.input_ids[body].tolist(), seq.document[body].tolist()
    special = (~seq.keep[body]).tolist() if not packer.keep_special else [False] * len(ids)
    if packer.keep_special:
        cut = kept - pre - suf
    else:
        cut = int(torch.nonzero(seq.keep[body].cumsum(0) == kept)[0]) + 1
    if cut < 1:  # keep_special_tokens and fewer rows left than the wrap itself: cut the wrapped sequence
        return PackedSequence(seq.split, seq.index, seq.input_ids[:kept], seq.document[:kept], seq.keep[:kept])
    return packer.wrap(ids[:cut], docs[:cut], special[:cut], index=seq.index)


def _tokenized(data_cfg: Any, tokenizer: PreTrainedTokenizerBase,
               doc_filter: Callable[[int], bool] | None) -> Iterator[tuple[int, list[int]]]:
    """(document index, token ids) in document order, tokenized in batches (the fast tokenizers
    encode a batch in parallel); documents with no tokens are dropped."""
    batch: list[tuple[int, str]] = []
    chars = 0
    for doc_index, text in iter_documents(data_cfg):
        if doc_filter is not None and not doc_filter(doc_index):
            continue
        batch.append((doc_index, text))
        chars += len(text)
        if len(batch) >= _TOKENIZE_BATCH_DOCS or chars >= _TOKENIZE_BATCH_CHARS:
            yield from _encode(tokenizer, batch)
            batch, chars = [], 0
    if batch:
        yield from _encode(tokenizer, batch)


def _encode(tokenizer: PreTrainedTokenizerBase, batch: list[tuple[int, str]]) -> Iterator[tuple[int, list[int]]]:
    encoded = tokenizer([text for _, text in batch], add_special_tokens=False, split_special_tokens=True,
                        verbose=False, return_attention_mask=False, return_token_type_ids=False)["input_ids"]
    for (doc_index, _), ids in zip(batch, encoded, strict=True):
        if ids:
            yield doc_index, list(ids)


def _check(data_cfg: Any, tokenizer: PreTrainedTokenizerBase, layout: SpecialLayout, max_tokens: int | None) -> None:
    if not 0.0 <= data_cfg.heldout_fraction <= 1.0:
        raise TextError(f"data.heldout_fraction must be in [0, 1] (got {data_cfg.heldout_fraction})")
    if max_tokens is not None and max_tokens < 1:
        raise TextError(f"harvest.max_tokens must be at least 1 (got {max_tokens}); use null for the whole source")
    if data_cfg.max_length <= layout.n_special:
        raise TextError(f"data.max_length={data_cfg.max_length} leaves no room for text after the "
                        f"{layout.n_special} special tokens the model adds; raise data.max_length")
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and limit < 1_000_000 and data_cfg.max_length > limit:
        raise TextError(f"data.max_length={data_cfg.max_length} exceeds the model's limit of {limit} tokens; "
                        f"set data.max_length <= {limit}")
