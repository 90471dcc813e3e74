"""What makes two harvests the same cache (identity) and what is recorded beside it (metadata).

Identity decides resume vs refuse, so it holds every setting that changes which rows the cache
holds or their values, and nothing that merely says how much of them to produce (the token
budget is not identity: a larger one extends a complete cache) or how fast (batch size, device).
A local model folder is named portably (its config's `_name_or_path`, if any) and fingerprinted by
hashes of its config, tokenizer files and a sample of its weight files, so a moved or renamed folder
still resumes while a retrained one does not.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch
import xxhash
from transformers import PreTrainedTokenizerBase

from harvest.model import LoadedModel, dtype_name
from settings import Config

HOOK = "resid_post (block output)"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                    "tokenizer.model", "special_tokens_map.json", "added_tokens.json")
_SAMPLE = 1 << 20


def _file_hash(path: Path) -> str:
    h = xxhash.xxh3_64()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _weights_sample_hash(folder: Path) -> str:
    """xxh3 over (name, size, first MiB, last MiB) of each weight file: cheap even for large models,
    and different for two random initialisations of the same config."""
    h = xxhash.xxh3_64()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES)):
        size = path.stat().st_size
        h.update(f"{path.name}\0{size}\0".encode())
        with path.open("rb") as f:
            h.update(f.read(_SAMPLE))
            if size > 2 * _SAMPLE:
                f.seek(size - _SAMPLE)
                h.update(f.read(_SAMPLE))
            elif size > _SAMPLE:
                h.update(f.read())
    return h.hexdigest()


def model_fingerprint(requested: str, resolved: str) -> dict:
    """{"model": name, ...hashes for a local folder}. `requested` is model.language_model_path as the
    user wrote it; `resolved` what it resolved to (a folder for an installed model package)."""
    folder = Path(resolved).expanduser()
    if not folder.is_dir():
        return {"model": requested}
    config_path = folder / "config.json"
    raw = json.loads(config_path.read_text()) if config_path.is_file() else {}
    user_path = Path(requested).expanduser().exists()
    # A folder is known by its contents: its path (and name) may change when it is moved or copied.
    name = (raw.get("_name_or_path") or "(local folder)") if user_path else requested
    tok = xxhash.xxh3_64()
    for fname in _TOKENIZER_FILES:
        if (folder / fname).is_file():
            tok.update(f"{fname}\0{_file_hash(folder / fname)}\0".encode())
    return {"model": name, "model_config_xxh3": _file_hash(config_path) if config_path.is_file() else None,
            "model_weights_xxh3_sample": _weights_sample_hash(folder), "tokenizer_files_xxh3": tok.hexdigest()}


def tokenizer_info(tokenizer: PreTrainedTokenizerBase) -> dict:
    return {
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "sep_token_id": getattr(tokenizer, "sep_token_id", None),
        "cls_token_id": getattr(tokenizer, "cls_token_id", None),
        "pad_token_id": tokenizer.pad_token_id,
    }


def build_identity(cfg: Config, *, resolved_model: str, layers: list[int], compute_dtype: torch.dtype,
                   store_dtype: torch.dtype | str, tokenizer: PreTrainedTokenizerBase, source: dict,
                   packing: dict) -> dict:
    """The identity dict handed to the cache writer (equal identity -> resume)."""
    data, hv = cfg.data, cfg.harvest
    return {
        **model_fingerprint(cfg.model.language_model_path, resolved_model),
        "revision": cfg.model.revision,
        "tokenizer": {"class": type(tokenizer).__name__, "vocab_size": len(tokenizer)},
        "hook": HOOK,
        "layers": list(layers),
        "text_source": source,
        "packing": packing,
        "dataset_split": data.dataset_split,
        "text_field": data.text_field,
        "max_samples": data.max_samples,
        "heldout_fraction": data.heldout_fraction,
        "max_length": data.max_length,
        "compute_dtype": dtype_name(compute_dtype),
        "store_dtype": store_dtype if isinstance(store_dtype, str) else dtype_name(store_dtype),
        "keep_special_tokens": hv.keep_special_tokens,
        "seed": data.seed,
        "shuffle_window": hv.shuffle_window,
    }


def build_metadata(cfg: Config, lm: LoadedModel, *, resolved_model: str, tokenizer: PreTrainedTokenizerBase,
                   tokenizer_facts: dict, resolved_config: dict) -> dict:
    """Free-form provenance for the manifest (the identity's details, versions, the whole config)."""
    import transformers

    return {
        "model": {
            "requested": cfg.model.language_model_path,
            "resolved": resolved_model,
            "architectures": list(getattr(lm.config, "architectures", None) or [type(lm.model).__name__]),
            "model_type": getattr(lm.config, "model_type", None),
            "class": type(lm.model).__name__,
            "n_blocks": lm.n_blocks,
            "block_path": lm.block_path,
            "d_model": lm.d_model,
            "dtype": dtype_name(lm.dtype),
            "device": str(lm.device),
        },
        "hook": HOOK,
        "layer_numbering": "layer L = output of block L (from 0) = hidden_states[L+1], read by a forward hook",
        "tokenizer": {**tokenizer_info(tokenizer), **tokenizer_facts},
        "special_tokens": "kept" if cfg.harvest.keep_special_tokens else "excluded (they run through the model)",
        "shuffle": {"window_sequences": cfg.harvest.shuffle_window, "seed": cfg.data.seed,
                    "generator": "numpy default_rng([seed, split code (train 0, heldout 1), chunk])"},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "config": resolved_config,
    }
