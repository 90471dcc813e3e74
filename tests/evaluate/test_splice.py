"""Splicing: CE loss score, KL and the locality of the hook, on tiny models built from configs."""

import pytest
import torch
from tiny_models import VOCAB_SIZE, tiny_model

from evaluate.splice import CausalFidelity, EncoderFidelity, ce_loss_score, splice, zero_replace
from harvest.model import wrap_model

LAYER = 1


def _identity(layer, h):
    return h


@pytest.fixture(scope="module")
def trained_gpt2():
    """A tiny GPT-2 trained for a few steps on a repeating pattern, so that its clean loss is far
    below the zero-ablated one (a random model's two losses barely differ)."""
    torch.manual_seed(0)
    model = tiny_model("gpt2").train()
    pattern = torch.randint(0, VOCAB_SIZE, (12,))
    ids = pattern.repeat(4)[None].repeat(4, 1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return wrap_model(model, path="tiny-gpt2", causal=True), ids


def test_ce_loss_score_identity_one_zero_ablation_zero(trained_gpt2):
    lm, ids = trained_gpt2
    attn = torch.ones_like(ids)
    mask = {LAYER: torch.ones_like(ids, dtype=torch.bool)}
    ident = CausalFidelity()
    ident.update(lm.model, lm.blocks, mask, _identity, ids, attn)
    r = ident.result()
    # independent: HF's own loss on the unhooked model
    with torch.no_grad():
        ref = lm.model(input_ids=ids, labels=ids).loss.item()
    assert r["ce_clean"] == pytest.approx(ref, rel=1e-5)
    assert r["ce_zero"] > r["ce_clean"] + 1.0  # the losses differ clearly
    assert r["ce_sae"] == pytest.approx(r["ce_clean"], abs=1e-6)
    assert r["ce_loss_score"] == pytest.approx(1.0, abs=1e-5)
    assert r["kl_per_token"] == pytest.approx(0.0, abs=1e-6)
    zero = CausalFidelity()
    zero.update(lm.model, lm.blocks, mask, zero_replace, ids, attn)
    z = zero.result()
    assert z["ce_loss_score"] == pytest.approx(0.0, abs=1e-6)
    assert z["kl_per_token"] > 0.5


def test_kl_matches_direct_formula(trained_gpt2):
    lm, ids = trained_gpt2
    attn = torch.ones_like(ids)
    mask = {LAYER: torch.rand(ids.shape) < 0.5}
    noisy = lambda layer, h: h + 0.3 * torch.ones_like(h)  # noqa: E731
    acc = CausalFidelity()
    acc.update(lm.model, lm.blocks, mask, noisy, ids, attn)
    with torch.no_grad():
        p = lm.model(input_ids=ids).logits[:, :-1].log_softmax(-1)
        with splice(lm.blocks, mask, noisy):
            q = lm.model(input_ids=ids).logits[:, :-1].log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).mean()
    assert acc.result()["kl_per_token"] == pytest.approx(kl.item(), rel=1e-5)


def test_splice_changes_only_hooked_layer_and_positions():
    lm = wrap_model(tiny_model("llama"), path="tiny-llama", causal=True)
    ids = torch.randint(0, VOCAB_SIZE, (2, 10))
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 6] = mask[1, 3] = mask[1, 8] = True

    def capture():
        outs = {}
        hooks = [b.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, (o[0] if isinstance(o, tuple)
                                                                                  else o).clone()))
                 for i, b in enumerate(lm.blocks)]
        return outs, hooks

    with torch.no_grad():
        clean, hooks = capture()
        lm.model(input_ids=ids)
        for h in hooks:
            h.remove()
        spliced, hooks = capture()
        with splice(lm.blocks, {LAYER: mask}, lambda layer, h: h + 1.0):
            lm.model(input_ids=ids)
        for h in hooks:
            h.remove()
    # hooks registered before the splice see the block output before the replacement: compare after
    assert torch.equal(clean[0], spliced[0])  # earlier block untouched
    later = spliced[LAYER + 1] - clean[LAYER + 1]
    changed = later.abs().amax(-1) > 1e-6
    # causal: a position changes only at or after the first spliced position of its sequence
    assert not changed[0, :6].any() and changed[0, 6:].all()
    assert not changed[1, :3].any() and changed[1, 3:].all()
    # the hook's own output: exactly +1 at the chosen positions, identical elsewhere
    seen = {}
    with torch.no_grad(), splice(lm.blocks, {LAYER: mask}, lambda layer, h: h + 1.0):
        handle = lm.blocks[LAYER + 1].register_forward_pre_hook(
            lambda m, args, kwargs: seen.__setitem__("x", (args[0] if args else kwargs["hidden_states"]).clone()),
            with_kwargs=True)
        lm.model(input_ids=ids)
        handle.remove()
    delta = seen["x"] - clean[LAYER]
    assert torch.allclose(delta[mask], torch.ones_like(delta[mask]))
    assert torch.equal(delta[~mask], torch.zeros_like(delta[~mask]))


def test_encoder_cosines():
    lm = wrap_model(tiny_model("minilm"), path="minilm", causal=False)
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102], [101, 7592, 2088, 102, 0, 0]])
    attn = (torch.arange(6) < torch.tensor([[6], [4]])).long()
    mask = {2: attn.bool() & (ids != 101) & (ids != 102)}
    acc = EncoderFidelity()
    acc.update(lm.model, lm.blocks, mask, _identity, ids, attn)
    r = acc.result()
    assert r["embedding_cos_sae"] == pytest.approx(1.0, abs=1e-6)
    assert r["embedding_cos_zero"] < 0.99
    assert r["sequences"] == 2


def test_ce_loss_score_undefined_warns():
    with pytest.warns(UserWarning, match="undefined"):
        assert ce_loss_score(2.0, 2.1, 2.0) is None
    assert ce_loss_score(1.0, 2.0, 3.0) == pytest.approx(0.5)
