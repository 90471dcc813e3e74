"""VanillaSAE: hand-computed encode/decode and loss, save/load, bad input, learning a known dictionary."""

import numpy as np
import pytest
import torch

from sae import SAEConfig, get, load_sae
from sae.vanilla import VanillaSAE
from tests.sae.synthetic import feature_recovery, fit, heldout_fvu, make_sparse_data

# d_in = 3, d_sae = 4. Rows are latents: W_ENC_ROWS[j] is what latent j reads (the parameter is its
# transpose, [d_in, d_sae]); W_DEC[j] is what it writes.
W_ENC_ROWS = [[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]]
B_ENC = [0.0, -1, 0.5, -2]
W_DEC = [[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0.6, 0.8, 0]]
B_DEC = [0.5, 0, -0.5]
SCALE = 2.0
# Raw x; normalised x = 2 x_raw = [[3, 2, .5], [0, -2, 2]]; x - b_dec = [[2.5, 2, 1], [-.5, -2, 2.5]]
#   pre = [[2.5, 2-1, 1+.5, 5.5-2], [-.5, -2-1, 2.5+.5, 0-2]] = [[2.5, 1, 1.5, 3.5], [-.5, -3, 3, -2]]
#   f = ReLU(pre) = [[2.5, 1, 1.5, 3.5], [0, 0, 3, 0]]
#   xhat (normalised) = b_dec + f W_dec: [.5+2.5+2.1, 1+2.8, -.5+1.5] = [5.1, 3.8, 1]; [.5, 0, -.5+3]
X_RAW = [[1.5, 1.0, 0.25], [0.0, -1.0, 1.0]]
F_HAND = [[2.5, 1.0, 1.5, 3.5], [0.0, 0.0, 3.0, 0.0]]
XHAT_NORM = [[5.1, 3.8, 1.0], [0.5, 0.0, 2.5]]


def hand_model() -> VanillaSAE:
    model = VanillaSAE(SAEConfig(type="vanilla", hidden_size=3, latent_size=4, k=1))
    with torch.no_grad():
        model.W_enc.copy_(torch.tensor(W_ENC_ROWS).T)
        model.b_enc.copy_(torch.tensor(B_ENC))
        model.W_dec.copy_(torch.tensor(W_DEC))
        model.b_dec.copy_(torch.tensor(B_DEC))
    model.set_input_scale(SCALE)
    return model


def test_registered_under_both_names():
    assert get("vanilla") is VanillaSAE and get("VanillaSAE") is VanillaSAE


def test_hand_built_encode_decode():
    model = hand_model()
    x = torch.tensor(X_RAW)
    assert torch.allclose(model.encode(x), torch.tensor(F_HAND))
    assert torch.allclose(model.decode(torch.tensor(F_HAND)), torch.tensor(XHAT_NORM) / SCALE, atol=1e-6)
    assert torch.allclose(model.reconstruct(x), torch.tensor(XHAT_NORM) / SCALE, atol=1e-6)
    out = model(x)
    assert torch.allclose(out["target"], 2 * x)
    assert torch.allclose(out["feature_acts"], torch.tensor(F_HAND))
    assert torch.allclose(out["sae_out"], torch.tensor(XHAT_NORM), atol=1e-6)
    # the same from the formula in numpy, with leading batch dims [2, 1, 3]
    xn = SCALE * np.array(X_RAW)
    f = np.maximum((xn - B_DEC) @ np.array(W_ENC_ROWS).T + B_ENC, 0)
    assert np.allclose(f, F_HAND)
    assert torch.allclose(model.encode(x[:, None, :]), torch.tensor(F_HAND)[:, None, :])


def test_loss_terms_by_hand():
    model = hand_model()
    out = model(torch.tensor(X_RAW))
    terms = model.loss(out, l1_coefficient=0.1)
    # errors xhat - x: [5.1-3, 3.8-2, 1-.5] = [2.1, 1.8, .5] -> 7.9; [.5, 2, .5] -> 4.5
    assert terms["mse"].item() == pytest.approx((7.9 + 4.5) / 2, rel=1e-6)
    assert terms["l1"].item() == pytest.approx((8.5 + 3.0) / 2, rel=1e-6)
    assert terms["total"].item() == pytest.approx(6.2 + 0.1 * 5.75, rel=1e-6)
    # d l1 / d b_enc_j = share of tokens where latent j is active: [1/2, 1/2, 2/2, 1/2]
    terms["l1"].backward()
    assert torch.allclose(model.b_enc.grad, torch.tensor([0.5, 0.5, 1.0, 0.5]))


def test_save_load_identical(tmp_path):
    torch.manual_seed(1)
    model = VanillaSAE(SAEConfig(type="vanilla", hidden_size=8, latent_size=16, k=1))
    with torch.no_grad():
        model.b_enc.normal_()
        model.b_dec.normal_()
    model.set_input_scale(3.0)
    model.save(tmp_path / "sae", meta={"run": "test"})
    loaded, meta = load_sae(tmp_path / "sae")
    assert type(loaded) is VanillaSAE and loaded.cfg.type == "VanillaSAE" and meta == {"run": "test"}
    x = torch.randn(32, 8)
    for key, value in model(x).items():
        assert torch.equal(loaded(x)[key], value), key
    assert torch.equal(loaded.reconstruct(x), model.reconstruct(x))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="n_layers"):
        VanillaSAE(SAEConfig(type="vanilla", hidden_size=3, latent_size=4, k=1, n_layers=2))
    with pytest.raises(ValueError, match="expects activations"):
        hand_model()(torch.zeros(2, 5))


@pytest.fixture
def one_thread():
    """Small GEMMs on 2 shared cores: a second OpenMP thread only spins (10x slower under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_learns_a_known_dictionary(one_thread):
    """512 true unit features in d=64, 4 active per sample: a 640-latent SAE recovers them."""
    x, dictionary = make_sparse_data(40_000, seed=0)
    model = VanillaSAE(SAEConfig(type="vanilla", hidden_size=64, latent_size=640, k=1))
    fit(model, x[:32_768], steps=1000, lr=2e-3, l1_coefficient=0.3)
    held_out = x[32_768:]
    fvu = heldout_fvu(model, held_out)
    recovered = feature_recovery(model.W_dec, dictionary)
    with torch.no_grad():
        l0 = (model.encode(held_out) > 0).float().sum(dim=1).mean().item()
    assert fvu < 0.1, fvu
    assert recovered >= 0.8, recovered
    # The L1 term did sparsify: the tied init fires about half of the latents on every token.
    assert l0 < 640 / 3, l0
