"""TopKSAE: hand-computed encode/decode, exact-k selection, the loss, and learning a known dictionary."""

import numpy as np
import pytest
import torch

import sae.topk
from sae import SAEConfig, get
from sae.topk import TopKSAE
from tests.sae.synthetic import feature_recovery, fit, heldout_fvu, make_sparse_data, single_thread

# d_in = 3, d_sae = 4, weights small enough to do by hand.
W_ENC = [[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]]
B_ENC = [0.0, 0, -1, -2]
W_DEC = [[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0.6, 0.8, 0]]
B_DEC = [0.5, 0, 0]


def hand_model(impl: str = "sparse", k: int = 2, cls: str = "topk") -> torch.nn.Module:
    model = get(cls)(SAEConfig(type=cls, hidden_size=3, latent_size=4, k=k, decode_impl=impl))
    with torch.no_grad():
        model.W_enc.copy_(torch.tensor(W_ENC))
        model.b_enc.copy_(torch.tensor(B_ENC))
        model.W_dec.copy_(torch.tensor(W_DEC))
        model.b_dec.copy_(torch.tensor(B_DEC))
    return model


# x = [2.5, 3, 0.5]: x - b_dec = [2, 3, .5]; z = [2, 3, -.5, 5.5 - 2 = 3.5]; top-2 = latents 3, 1
#   f = [0, 3, 0, 3.5]; x_hat = [.5, 0, 0] + 3 [0, 1, 0] + 3.5 [.6, .8, 0] = [2.6, 5.8, 0]
# x = [.5, -1, -2]: x - b_dec = [0, -1, -2]; z = [0, -1, -3, -5]; top-2 = latents 0, 1, both <= 0
#   f = 0 after ReLU; x_hat = b_dec
X = [[2.5, 3.0, 0.5], [0.5, -1.0, -2.0]]
F_HAND = [[0.0, 3.0, 0.0, 3.5], [0.0, 0.0, 0.0, 0.0]]
XHAT_HAND = [[2.6, 5.8, 0.0], [0.5, 0.0, 0.0]]


@pytest.mark.parametrize("impl", ["sparse", "dense"])
def test_hand_built_encode_decode(impl):
    model = hand_model(impl)
    x = torch.tensor(X)
    assert torch.allclose(model.encode(x), torch.tensor(F_HAND))
    assert torch.allclose(model.reconstruct(x), torch.tensor(XHAT_HAND), atol=1e-6)
    out = model(x)
    assert torch.allclose(out["sae_out"], torch.tensor(XHAT_HAND), atol=1e-6)
    assert torch.allclose(out["feature_acts"], torch.tensor(F_HAND))
    assert sorted(out["top_idx"][0].tolist()) == [1, 3]
    # numpy, independently: the same numbers from the formula
    z = (np.array(X) - B_DEC) @ np.array(W_ENC).T + B_ENC
    keep = np.argsort(-z, axis=1)[:, :2]
    f = np.zeros_like(z)
    np.put_along_axis(f, keep, np.maximum(np.take_along_axis(z, keep, 1), 0), 1)
    assert np.allclose(f @ np.array(W_DEC) + B_DEC, XHAT_HAND)
    # plain mse: sample 1 error [-0.1, -2.8, 0.5], sample 2 error [0, -1, -2]
    expected_mse = ((0.01 + 7.84 + 0.25) + (0 + 1 + 4)) / 2
    assert model.loss(out)["mse"].item() == pytest.approx(expected_mse, rel=1e-6)


def test_input_scale_is_applied_and_undone():
    model = hand_model()
    model.set_input_scale(4.0)  # x_normalised = 4 * x_raw
    x_raw = torch.tensor(X) / 4.0
    assert torch.allclose(model.encode(x_raw), torch.tensor(F_HAND))
    assert torch.allclose(model.reconstruct(x_raw), torch.tensor(XHAT_HAND) / 4.0, atol=1e-6)
    assert torch.allclose(model.decode(torch.tensor(F_HAND)), torch.tensor(XHAT_HAND) / 4.0, atol=1e-6)
    assert torch.allclose(model(x_raw)["target"], torch.tensor(X))


@pytest.mark.parametrize("impl", ["sparse", "dense"])
def test_exactly_k_selected_and_at_most_k_nonzero(impl):
    torch.manual_seed(0)
    k = 5
    model = TopKSAE(SAEConfig(type="topk", hidden_size=16, latent_size=64, k=k, decode_impl=impl))
    with torch.no_grad():
        model.b_enc.fill_(-1.5)  # so that some kept values are negative and ReLU zeroes them
    out = model(torch.randn(200, 16))
    assert out["top_idx"].shape == (200, k)
    assert all(len(set(row)) == k for row in out["top_idx"].tolist())
    nonzero = (out["feature_acts"] != 0).sum(dim=1)
    assert (nonzero <= k).all() and (nonzero < k).any()
    # the kept entries are the k largest pre-activations of each row
    z = out["pre_acts"].detach()
    kth = z.topk(k, dim=1).values[:, -1:]
    assert (z.gather(1, out["top_idx"]) >= kth).all()
    # fired() reads the kept indices and agrees with the dense activations
    sparse_out = model(torch.randn(200, 16), dense_acts=False)
    assert "feature_acts" not in sparse_out
    dense_fired = (densify_from(sparse_out, 64) != 0).any(dim=0)
    assert torch.equal(model.fired(sparse_out), dense_fired)


def densify_from(out, m):
    f = torch.zeros(out["sel_offsets"].shape[0], m)
    f[out["sel_rows"], out["sel_idx"]] = out["sel_val"].detach()
    return f


def test_wrong_input_shape_is_refused():
    model = hand_model()
    with pytest.raises(ValueError, match=r"\[\.\.\., 3\].*\(2, 4\)"):
        model(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="batch of tokens"):
        model(torch.zeros(2, 5, 3))
    with pytest.raises(TypeError, match="floating"):
        model.encode(torch.zeros(2, 3, dtype=torch.long))


def test_topk_learns_known_dictionary():
    x, dictionary = make_sparse_data(40_000, d=64, n_features=512, active=2, seed=0)
    torch.manual_seed(0)
    model = TopKSAE(SAEConfig(type="topk", hidden_size=64, latent_size=1024, k=4))
    with single_thread():
        fit(model, x[:36_000], steps=600, lr=5e-3, decay_fraction=0.3)
        fvu, recovery = heldout_fvu(model, x[36_000:]), feature_recovery(model.W_dec, dictionary)
    print(f"TopK: FVU {fvu:.3f}, recovery {recovery:.3f}")
    assert fvu < 0.1 and recovery >= 0.8


def test_the_fused_cpu_encoder_gives_the_step_the_same_loss_and_gradients(monkeypatch):
    """dense_acts=False on the CPU: no [B, M] z (encode_topk; forced here in float32, where it does not
    pay); in float32 the same selection, loss and gradients as the path that keeps z. In bf16 the two
    round z differently (the fused one adds the bias in float32 after the product's rounding), so
    near-ties at the cut may go either way: tests/sae/test_selection.py checks its selection against its definition, and
    tests/train/test_precision.py the quality of bf16 training, which runs through it."""
    monkeypatch.setattr(sae.topk, "FUSED_ENCODE_DTYPES", (torch.float32, torch.bfloat16))
    torch.manual_seed(8)
    x = torch.randn(300, 16) * 2
    grads, outs = {}, {}
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(TopKSAE, "_fused_encode", lambda self, xn: False)
        torch.manual_seed(9)
        model = TopKSAE(SAEConfig(type="topk", hidden_size=16, latent_size=512, k=6))
        with torch.no_grad():
            model.b_enc.copy_(torch.randn(512) * 0.5)
            model.b_dec.copy_(torch.randn(16) * 0.3)
        out = model(x, dense_acts=False)
        model.loss(out)["total"].backward()
        assert ("pre_acts" in out) == (not fused)  # the path under test
        outs[fused] = out
        grads[fused] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert torch.equal(outs[True]["top_idx"].sort(1).values, outs[False]["top_idx"].sort(1).values)
    assert torch.allclose(outs[True]["sae_out"], outs[False]["sae_out"], rtol=1e-5, atol=1e-6)
    for n in grads[True]:
        assert torch.allclose(grads[True][n], grads[False][n], rtol=1e-4, atol=1e-6), n


def test_a_float64_model_under_bf16_autocast_keeps_its_float64_encoder():
    """CPU autocast leaves float64 alone, so the encoder does too: the fused bf16 path is not taken."""
    model = TopKSAE(SAEConfig(type="topk", hidden_size=16, latent_size=256, k=4)).double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(10, 16, dtype=torch.float64), dense_acts=False)
    assert out["top_val"].dtype == torch.float64 and "pre_acts" in out
