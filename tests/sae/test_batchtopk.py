"""BatchTopKSAE: k*B selection over the batch, the inference threshold, and learning."""

import warnings

import pytest
import torch

from sae import SAEConfig, get
from sae.batchtopk import BatchTopKSAE
from sae.selection import batch_topk_flat, select_batch_topk
from tests.sae.synthetic import feature_recovery, fit, heldout_fvu, make_sparse_data, single_thread
from tests.sae.test_topk import X, hand_model


@pytest.mark.parametrize("impl", ["sparse", "dense"])
def test_hand_built_batch_selection(impl):
    # relu(z) rows: [2, 3, 0, 3.5] and [0, 0, 0, 0]; the top k*B = 4 over the batch are 3.5, 3, 2
    # and one zero, so token 0 gets three non-zero latents although k = 2.
    model = hand_model(impl, cls="batchtopk")
    out = model(torch.tensor(X))
    assert out["sel_idx"].numel() == 4
    assert torch.allclose(out["feature_acts"], torch.tensor([[2.0, 3, 0, 3.5], [0, 0, 0, 0]]))
    # x_hat_0 = [.5, 0, 0] + 2 [1, 0, 0] + 3 [0, 1, 0] + 3.5 [.6, .8, 0]
    assert torch.allclose(out["sae_out"], torch.tensor([[4.6, 5.8, 0.0], [0.5, 0, 0]]), atol=1e-6)


@pytest.mark.parametrize("impl", ["sparse", "dense"])
def test_selects_k_times_batch_over_the_batch(impl):
    torch.manual_seed(1)
    k, b, m = 4, 64, 128
    model = BatchTopKSAE(SAEConfig(type="batchtopk", hidden_size=16, latent_size=m, k=k, decode_impl=impl))
    x = torch.randn(b, 16) * torch.linspace(0.2, 3.0, b)[:, None]  # uneven norms -> uneven L0
    out = model(x)
    assert out["sel_idx"].numel() == k * b
    a = out["pre_acts"].detach().relu()
    kept = a[out["sel_rows"], out["sel_idx"]]
    assert torch.equal(kept.sort().values, a.reshape(-1).topk(k * b).values.sort().values)
    l0 = (out["feature_acts"] != 0).sum(dim=1)
    assert l0.float().mean() <= k and l0.max() > k  # a per-token bound of k would be wrong


def test_batch_topk_flat_is_exact_with_saturated_rows():
    torch.manual_seed(2)
    a = torch.rand(50, 300)
    a[7] += 10.0  # row 7 alone holds more winners than its candidate budget
    a[20, :5] += 5.0
    n = 310
    got = batch_topk_flat(a, n, candidates_per_row=8)
    assert got.unique().numel() == n
    flat = a.reshape(-1)
    assert torch.equal(flat[got].sort().values, flat.topk(n).values.sort().values)
    rows = got // 300
    assert (rows == 7).sum() == 300 and (rows == 20).sum() == 5
    sel = select_batch_topk(torch.zeros(4, 10), 2)  # nothing positive: still k*B entries
    assert sel.cols.numel() == 8 and torch.equal(sel.offsets, sel.counts().cumsum(0) - sel.counts())


def test_inference_is_independent_of_the_batch():
    torch.manual_seed(3)
    model = BatchTopKSAE(SAEConfig(type="batchtopk", hidden_size=16, latent_size=64, k=4))
    x, other = torch.randn(32, 16), torch.randn(32, 16) * 3
    mixed = torch.cat([x[:8], other[:24]])
    # in training the batch decides: the same 8 tokens get different latents beside louder ones
    assert not torch.equal(model.encode(x)[:8], model.encode(mixed)[:8])
    model.threshold.fill_(0.5)
    model.eval()
    alone = torch.cat([model.encode(x[i : i + 1]) for i in range(8)])
    for batch in (x, mixed):  # same latents, to GEMM rounding, whatever the rest of the batch
        f = model.encode(batch)[:8]
        assert torch.equal(f != 0, alone != 0) and torch.allclose(f, alone, atol=1e-6)
    a = model(x)["pre_acts"].relu()
    assert torch.allclose(model.encode(x), a * (a > 0.5))


def test_threshold_is_an_ema_of_the_smallest_positive_kept_value():
    model = BatchTopKSAE(SAEConfig(type="batchtopk", hidden_size=4, latent_size=8, k=2, threshold_momentum=0.9))
    assert model.threshold.item() == 0.0 and model.threshold.dtype == torch.float32
    model.estimate_threshold({"sel_val": torch.tensor([0.0, 0.8, 2.0, 0.5])})
    assert model.threshold.item() == pytest.approx(0.5)  # first estimate: the minimum itself
    model.estimate_threshold({"sel_val": torch.tensor([1.5, 3.0])})
    assert model.threshold.item() == pytest.approx(0.9 * 0.5 + 0.1 * 1.5)
    model.estimate_threshold({"sel_val": torch.tensor([0.0, 0.0])})  # nothing positive: unchanged
    assert model.threshold.item() == pytest.approx(0.6)
    model.eval()
    model.estimate_threshold({"sel_val": torch.tensor([9.0])})  # never from inference batches
    assert model.threshold.item() == pytest.approx(0.6)
    model.to(torch.bfloat16)
    assert model.threshold.dtype == torch.float32


def test_unestimated_threshold_falls_back_to_per_token_topk_and_warns_once():
    torch.manual_seed(4)
    model = BatchTopKSAE(SAEConfig(type="batchtopk", hidden_size=16, latent_size=64, k=3)).eval()
    x = torch.randn(10, 16)
    with pytest.warns(UserWarning, match="never estimated"):
        f = model.encode(x)
    z = model(x)["pre_acts"]
    expected = torch.zeros_like(z).scatter(1, z.topk(3, dim=1).indices, z.topk(3, dim=1).values.relu())
    assert torch.allclose(f, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.encode(x)  # second time: silent


def test_batchtopk_learns_known_dictionary():
    # k equal to the true number of active features: BatchTopK's budget is per batch, so a
    # larger k is spent on spurious latents and needs many more steps to reach the same FVU
    x, dictionary = make_sparse_data(40_000, d=64, n_features=512, active=2, seed=0)
    torch.manual_seed(0)
    model = BatchTopKSAE(SAEConfig(type="batchtopk", hidden_size=64, latent_size=1024, k=2))
    with single_thread():
        fit(model, x[:36_000], steps=800, lr=5e-3, decay_fraction=0.3)
        fvu, recovery = heldout_fvu(model, x[36_000:]), feature_recovery(model.W_dec, dictionary)
    print(f"BatchTopK (threshold {model.threshold.item():.3f}): FVU {fvu:.3f}, recovery {recovery:.3f}")
    assert model.threshold.item() > 0
    assert fvu < 0.1 and recovery >= 0.8


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_the_fused_cpu_encoder_gives_batch_level_training_the_same_step(monkeypatch, arch):
    """Training in bf16 on the CPU selects without z (encode_batch_topk); forced here in float64, where the
    step must equal the path that keeps z: same kept entries, loss and gradients (float64: a saturated
    row's GEMM over that row alone rounds too little differently to move the cut)."""
    import sae.topk

    monkeypatch.setattr(sae.topk, "FUSED_ENCODE_DTYPES", (torch.float64,))
    torch.manual_seed(3)
    x = torch.randn(200, 16, dtype=torch.float64) * 2
    x[11] *= 30  # a loud token, so that a row saturates its candidates
    outs, grads = {}, {}
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(sae.topk.TopKSAE, "_fused_encode", lambda self, xn: False)
        torch.manual_seed(5)
        extra = {"group_sizes": [64, 192]} if arch == "matryoshka" else {}
        model = get(arch)(SAEConfig(type=arch, hidden_size=16, latent_size=256, k=4, **extra)).double()
        model.train()
        out = model(x, dense_acts=False)
        model.loss(out)["total"].backward()
        assert ("pre_acts" in out) == (not fused)
        outs[fused] = out
        grads[fused] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert torch.equal(outs[True]["sel_rows"], outs[False]["sel_rows"])
    assert torch.equal(outs[True]["sel_idx"], outs[False]["sel_idx"])
    assert (outs[True]["sel_rows"] == 11).sum() > 8  # the saturated row kept more than its 2k candidates
    assert torch.allclose(outs[True]["sae_out"], outs[False]["sae_out"], rtol=1e-5, atol=1e-6)
    for n in grads[False]:
        assert torch.allclose(grads[True][n], grads[False][n], rtol=1e-4, atol=1e-6), n
