"""Load a Hugging Face model and capture the residual stream at the output of chosen blocks.

Layer L is the output of transformer block L, blocks counted from 0: `hidden_states[L+1]` in
transformers. We read it with a forward hook on the block itself, never from `hidden_states`,
because for families whose base model applies a final norm before returning (GPT-2, Llama,
Qwen2/3, Gemma, GPT-NeoX) `hidden_states[-1]` is the *normed* output of the last block; the hook
gives the un-normed residual stream for every block alike (for BERT the two agree everywhere).

The forward pass stops at the deepest requested block: its hook raises a private exception that
`forward_blocks` catches, so later blocks, the final norm and the LM head never run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harvest.tokenization import looks_like_local_path, resolve_model_path
from settings.device import resolve_device

# Attribute paths of the block list in the families we know, most specific first.
KNOWN_BLOCK_PATHS = (
    "model.layers",  # Llama, Qwen2/3, Gemma, Mistral (...ForCausalLM)
    "model.language_model.layers",  # multimodal wrappers (Gemma3, Qwen-VL)
    "transformer.h",  # GPT-2, GPT-J, Falcon
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
    "encoder.layer",  # BertModel, RobertaModel
    "bert.encoder.layer",
    "roberta.encoder.layer",
    "layers",  # LlamaModel, GPTNeoXModel (base models)
    "h",  # GPT2Model
    "transformer.layers",
    "backbone.layers",
)


class HarvestError(ValueError):
    """Bad input for a harvest: the message names the problem and the fix (printed as one line)."""


class _StopForward(Exception):
    """Raised by the deepest block's hook to end the forward pass early."""


@dataclass
class LoadedModel:
    model: nn.Module
    config: object  # transformers PretrainedConfig
    path: str  # what from_pretrained was given (resolved local folder or hub id)
    blocks: nn.ModuleList
    block_path: str  # attribute path of `blocks` inside `model`, e.g. "model.layers"
    n_blocks: int
    d_model: int
    dtype: torch.dtype  # compute dtype
    device: torch.device  # where inputs go (the embedding's device)
    causal: bool  # loaded through AutoModelForCausalLM


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device, *, key: str = "harvest.dtype") -> torch.dtype:
    """`auto` -> bfloat16 on CUDA, float32 elsewhere; else one of float32 | bfloat16 | float16."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise HarvestError(f"{key}={name!r} is not supported; use auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def text_config(config: object) -> object:
    """The language part of a (possibly multimodal) config."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def config_n_blocks(config: object) -> int | None:
    tc = text_config(config)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(tc, key, None)
        if isinstance(value, int):
            return value
    return None


def config_d_model(config: object) -> int | None:
    tc = text_config(config)
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(tc, key, None)
        if isinstance(value, int):
            return value
    return None


def parse_layers(spec: str | int | list[int], n_blocks: int) -> list[int]:
    """`harvest.layers` -> sorted block numbers. Accepts "all", a list, "a:b" (half-open; either end may
    be omitted), "3" or "1,4,7". Every block must exist: 0 <= L < n_blocks."""
    def out_of_range(bad: list[int]) -> HarvestError:
        return HarvestError(f"harvest.layers={spec!r}: block(s) {bad} out of range; the model has {n_blocks} blocks "
                            f"(0..{n_blocks - 1}); use e.g. harvest.layers=all or harvest.layers=0:{n_blocks}")

    if isinstance(spec, bool):
        raise HarvestError(f"harvest.layers={spec!r} is not a layer spec; use all, a list, or a range like 2:5")
    if isinstance(spec, int):
        spec = [spec]
    if isinstance(spec, str):
        text = spec.strip()
        if text == "all":
            return list(range(n_blocks))
        if ":" in text:
            start_s, _, stop_s = text.partition(":")
            try:
                start = int(start_s) if start_s.strip() else 0
                stop = int(stop_s) if stop_s.strip() else n_blocks
            except ValueError:
                raise HarvestError(f"harvest.layers={spec!r} is not a range; write a:b, e.g. 2:5") from None
            if start >= stop:
                raise HarvestError(f"harvest.layers={spec!r} is empty (a:b is half-open: b must exceed a)")
            bad = [x for x in (start, stop - 1) if not 0 <= x < n_blocks]
            if bad:
                raise out_of_range(bad)
            return list(range(start, stop))
        try:
            spec = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise HarvestError(f"harvest.layers={spec!r} is not a layer spec; use all, 1,4,7 or a range 2:5") from None
    layers = sorted(set(spec))
    if not layers:
        raise HarvestError("harvest.layers is empty; name at least one block (or all)")
    bad = [x for x in layers if not 0 <= x < n_blocks]
    if bad:
        raise out_of_range(bad)
    return layers


def find_blocks(model: nn.Module, n_blocks: int | None) -> tuple[str, nn.ModuleList]:
    """The model's list of transformer blocks: a known attribute path holding a ModuleList of
    `n_blocks` modules, else the first ModuleList of that length, else the largest ModuleList."""
    lists = {name: m for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0}
    for path in KNOWN_BLOCK_PATHS:
        if path in lists and (n_blocks is None or len(lists[path]) == n_blocks):
            return path, lists[path]
    if n_blocks is not None:
        for name, m in lists.items():
            if len(m) == n_blocks:
                return name, m
    if not lists:
        raise HarvestError(f"{type(model).__name__} has no nn.ModuleList of blocks; harvest cannot find its layers")
    name = max(lists, key=lambda k: len(lists[k]))
    return name, lists[name]


@contextmanager
def block_hooks(blocks: nn.ModuleList, layers: list[int],
                on_output: Callable[[int, torch.Tensor], None], *, stop_early: bool = True) -> Iterator[None]:
    """Forward hooks on `blocks[L]` for L in `layers` calling `on_output(L, hidden [B, T, d])`. With
    `stop_early`, the deepest block's hook then ends the forward pass (see `forward_blocks`).
    Hooks are removed on exit, also on error."""
    deepest = max(layers)
    handles = []

    def make_hook(layer: int):
        def hook(module: nn.Module, args: object, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple | list) else output
            on_output(layer, hidden)
            if stop_early and layer == deepest:
                raise _StopForward

        return hook

    try:
        for layer in layers:
            handles.append(blocks[layer].register_forward_hook(make_hook(layer)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def forward_blocks(lm: LoadedModel, layers: list[int], on_output: Callable[[int, torch.Tensor], None],
                   input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """Run the model on `input_ids` [B, T] / `attention_mask` [B, T] (on `lm.device`) up to and including
    block max(layers), calling `on_output(L, hidden [B, T, d_model])` for each requested block in order."""
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if lm.causal:
        kwargs["use_cache"] = False
    with torch.inference_mode(), block_hooks(lm.blocks, layers, on_output):
        try:
            lm.model(**kwargs)
        except _StopForward:
            return
    raise RuntimeError(f"the forward pass finished without reaching block {max(layers)}: "
                       f"{lm.block_path} is not the block list this model runs")


def _offline_fix(name: str) -> str:
    return (f"hub downloads need a network: on a connected machine run `hf download {name} --local-dir DIR` "
            f"(or copy the model folder here) and set model.language_model_path=DIR")


def load_config(path: str, *, revision: str | None, trust_remote_code: bool) -> object:
    """AutoConfig for a local folder or hub id, with a one-line error when it cannot be found."""
    from transformers import AutoConfig

    local = Path(path).expanduser()
    if not local.exists() and looks_like_local_path(path):
        raise HarvestError(f"model path {path} does not exist; set model.language_model_path to a local model folder "
                           f"(with config.json), an installed model package, or a hub id")
    if local.is_dir() and not (local / "config.json").is_file():
        raise HarvestError(f"model folder {path} has no config.json; point model.language_model_path at the folder "
                           f"that save_pretrained wrote")
    try:
        return AutoConfig.from_pretrained(str(local) if local.exists() else path, revision=revision,
                                          trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "trust_remote_code" in str(e):
            raise HarvestError(f"model {path} needs custom code: {first} (set model.trust_remote_code=true "
                               f"only if you trust it)") from e
        raise HarvestError(f"cannot load model {path!r}: {first}. It is not a local folder; "
                           f"{_offline_fix(path)}") from e


def _is_causal_lm(config: Any) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = getattr(config, "architectures", None) or []
    if archs:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    # No architectures recorded (a config built in code): causal if transformers has a causal-LM class for it
    # and it is not an encoder (BERT-likes register BertLMHeadModel, which we do not want for an encoder).
    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not getattr(config, "is_encoder_decoder", False) \
        and config.model_type not in ("bert", "roberta", "xlm-roberta", "electra", "camembert", "ernie")


def load_model(path: str, *, revision: str | None = None, dtype: str = "auto", device: str = "auto",
               trust_remote_code: bool = False, device_map: str | None = None) -> LoadedModel:
    """Load `path` (a local folder, GGUF file, installed model package or hub id) with
    AutoModelForCausalLM when its architecture is a causal LM, else AutoModel; eval mode, compute
    dtype `dtype`, on `device` (or spread by `device_map`, which is passed to from_pretrained)."""
    from transformers import AutoModel, AutoModelForCausalLM

    path = resolve_model_path(path)
    config = load_config(path, revision=revision, trust_remote_code=trust_remote_code)
    dev = resolve_device(device, key="harvest.device")
    torch_dtype = resolve_dtype(dtype, dev)
    causal = _is_causal_lm(config)
    auto = AutoModelForCausalLM if causal else AutoModel
    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code, "dtype": torch_dtype}
    if device_map:
        kwargs["device_map"] = device_map
    local = str(Path(path).expanduser()) if Path(path).expanduser().exists() else path
    try:
        model: Any = auto.from_pretrained(local, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HarvestError(f"cannot load the weights of model {path!r}: {first}") from e
    if not device_map:
        model.to(dev)
    return wrap_model(model.eval(), path=path, causal=causal)


def wrap_model(model: Any, *, path: str, causal: bool | None = None) -> LoadedModel:
    """Describe an already-built model (a transformers PreTrainedModel, e.g. a random-init benchmark
    model) as a LoadedModel."""
    config = model.config
    n_blocks = config_n_blocks(config)
    block_path, blocks = find_blocks(model, n_blocks)
    emb = model.get_input_embeddings()
    param = next(model.parameters())
    return LoadedModel(
        model=model, config=config, path=path, blocks=blocks, block_path=block_path, n_blocks=len(blocks),
        d_model=config_d_model(config) or emb.embedding_dim, dtype=param.dtype,
        device=emb.weight.device, causal=_is_causal_lm(config) if causal is None else causal)
