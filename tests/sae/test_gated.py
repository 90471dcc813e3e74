"""GatedSAE: hand-computed encode/decode and loss, where the auxiliary term's gradient goes (and
does not go), save/load, learning a known dictionary."""

import math

import numpy as np
import pytest
import torch

from sae import SAEConfig, get, load_sae
from sae.gated import GatedSAE
from tests.sae.synthetic import feature_recovery, fit, heldout_fvu, make_sparse_data

# d_in = 3, d_sae = 4; rows are latents (the W_gate parameter is the transpose, [d_in, d_sae]).
W_GATE_ROWS = [[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]]
B_GATE = [0.0, -1, 0.5, -2]
R_MAG = [0.0, math.log(2.0), 0.0, math.log(0.5)]
B_MAG = [0.5, 0, -2, 1]
W_DEC = [[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0.6, 0.8, 0]]
B_DEC = [0.5, 0, -0.5]
SCALE = 2.0
X_RAW = [[1.5, 1.0, 0.25], [0.0, -1.0, 1.0]]
# normalised x = [[3, 2, .5], [0, -2, 2]]; u = W_gate (x - b_dec) = [[2.5, 2, 1, 5.5], [-.5, -2, 2.5, 0]]
# pi_gate = u + b_gate        = [[2.5, 1, 1.5, 3.5], [-.5, -3, 3, -2]]
# pi_mag = e^r_mag u + b_mag  = [[3, 4, -1, 3.75], [0, -4, .5, 1]]
# f = 1[pi_gate > 0] ReLU(pi_mag): latent 2 of token 1 is gated open but has a negative magnitude;
# latent 3 of token 2 has a positive magnitude but a closed gate.
F_HAND = [[3.0, 4.0, 0.0, 3.75], [0.0, 0.0, 0.5, 0.0]]
# xhat = b_dec + f W_dec = [.5 + 3 + 2.25, 4 + 3, -.5] ; [.5, 0, -.5 + .5]
XHAT_NORM = [[5.75, 7.0, -0.5], [0.5, 0.0, 0.0]]
LAMBDA = 0.1


def hand_model() -> GatedSAE:
    model = GatedSAE(SAEConfig(type="gated", hidden_size=3, latent_size=4, k=1))
    with torch.no_grad():
        model.W_gate.copy_(torch.tensor(W_GATE_ROWS).T)
        model.b_gate.copy_(torch.tensor(B_GATE))
        model.r_mag.copy_(torch.tensor(R_MAG))
        model.b_mag.copy_(torch.tensor(B_MAG))
        model.W_dec.copy_(torch.tensor(W_DEC))
        model.b_dec.copy_(torch.tensor(B_DEC))
    model.set_input_scale(SCALE)
    return model


def test_registered_under_both_names():
    assert get("gated") is GatedSAE and get("GatedSAE") is GatedSAE


def test_hand_built_encode_decode():
    model = hand_model()
    x = torch.tensor(X_RAW)
    assert torch.allclose(model.encode(x), torch.tensor(F_HAND))
    assert torch.allclose(model.decode(torch.tensor(F_HAND)), torch.tensor(XHAT_NORM) / SCALE, atol=1e-6)
    out = model(x)
    assert torch.allclose(out["feature_acts"], torch.tensor(F_HAND))
    assert torch.allclose(out["sae_out"], torch.tensor(XHAT_NORM), atol=1e-6)
    # W_mag = diag(exp r_mag) W_gate, written out in numpy
    xc = SCALE * np.array(X_RAW) - B_DEC
    w_mag = np.exp(R_MAG)[:, None] * np.array(W_GATE_ROWS)
    pi_gate = xc @ np.array(W_GATE_ROWS).T + B_GATE
    f = (pi_gate > 0) * np.maximum(xc @ w_mag.T + B_MAG, 0)
    assert np.allclose(f, F_HAND)


def test_loss_terms_by_hand():
    model = hand_model()
    terms = model.loss(model(torch.tensor(X_RAW)), l1_coefficient=LAMBDA)
    # mse: errors xhat - x = [2.75, 5, -1] -> 33.5625 and [.5, 2, -2] -> 8.25
    assert terms["mse"].item() == pytest.approx((33.5625 + 8.25) / 2, rel=1e-6)
    # l1 = sum ReLU(pi_gate): 2.5 + 1 + 1.5 + 3.5 = 8.5 and 3
    assert terms["l1"].item() == pytest.approx((8.5 + 3.0) / 2, rel=1e-6)
    # aux: b_dec + ReLU(pi_gate) W_dec = [5.1, 3.8, 1] and [.5, 0, 2.5]; errors [2.1, 1.8, .5], [.5, 2, .5]
    assert terms["aux"].item() == pytest.approx((7.9 + 4.5) / 2, rel=1e-6)
    assert terms["total"].item() == pytest.approx(20.90625 + LAMBDA * 5.75 + 6.2, rel=1e-6)


def _grads(loss: torch.Tensor, model: GatedSAE) -> dict[str, torch.Tensor]:
    names, params = zip(*model.named_parameters(), strict=True)
    grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    return {n: torch.zeros_like(p) if g is None else g for n, p, g in zip(names, params, grads, strict=True)}


def test_aux_term_sends_no_gradient_into_the_decoder():
    torch.manual_seed(0)
    model = GatedSAE(SAEConfig(type="gated", hidden_size=6, latent_size=10, k=1))
    with torch.no_grad():
        model.b_dec.normal_()
        model.b_gate.normal_(0.0, 0.5)
    grads = _grads(model.loss(model(torch.randn(16, 6)))["aux"], model)
    assert torch.count_nonzero(grads["W_dec"]) == 0 and torch.count_nonzero(grads["b_dec"]) == 0
    assert torch.count_nonzero(grads["r_mag"]) == 0 and torch.count_nonzero(grads["b_mag"]) == 0
    assert grads["W_gate"].abs().sum() > 0 and grads["b_gate"].abs().sum() > 0


def test_b_gate_learns_from_sparsity_and_aux_terms():
    model = hand_model()
    terms = model.loss(model(torch.tensor(X_RAW)), l1_coefficient=LAMBDA)
    # The Heaviside gate passes no gradient: the reconstruction alone leaves b_gate untrained ([ZP]'s bug).
    assert torch.count_nonzero(_grads(terms["mse"], model)["b_gate"]) == 0
    # d total / d b_gate_j = mean_t 1[pi_gate_tj > 0] (lambda + 2 (xhat_aux_t - x_t) . d_j)
    # aux errors e = [2.1, 1.8, .5], [.5, 2, .5]; e . d_j = [2.1, 1.8, .5, 2.7] (all gates open) and
    # only latent 2 open in token 2 with e . d_2 = .5
    tok1 = [LAMBDA + 2 * v for v in (2.1, 1.8, 0.5, 2.7)]
    tok2 = [0.0, 0.0, LAMBDA + 2 * 0.5, 0.0]
    expected = torch.tensor([(a + b) / 2 for a, b in zip(tok1, tok2, strict=True)])
    assert torch.allclose(_grads(terms["total"], model)["b_gate"], expected, atol=1e-5)


def test_save_load_identical(tmp_path):
    torch.manual_seed(1)
    model = GatedSAE(SAEConfig(type="gated", hidden_size=8, latent_size=16, k=1))
    with torch.no_grad():
        for p in (model.b_gate, model.r_mag, model.b_mag, model.b_dec):
            p.normal_(0.0, 0.3)
    model.set_input_scale(0.5)
    model.save(tmp_path / "sae")
    loaded, _ = load_sae(tmp_path / "sae")
    assert type(loaded) is GatedSAE
    x = torch.randn(32, 8)
    for key, value in model(x).items():
        assert torch.equal(loaded(x)[key], value), key
    assert torch.equal(loaded.encode(x), model.encode(x))


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
    model = GatedSAE(SAEConfig(type="gated", hidden_size=64, latent_size=640, k=1))
    fit(model, x[:32_768], steps=1000, lr=2e-3, l1_coefficient=0.3)
    held_out = x[32_768:]
    fvu = heldout_fvu(model, held_out)
    recovered = feature_recovery(model.W_dec, dictionary)
    with torch.no_grad():
        l0 = (model.encode(held_out) > 0).float().sum(dim=1).mean().item()
    assert fvu < 0.1, fvu
    assert recovered >= 0.8, recovered
    assert l0 < 640 / 3, l0
