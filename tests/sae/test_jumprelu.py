"""JumpReLUSAE: hand-computed encode/decode and loss, the straight-through threshold gradients
(both the f path and the L0 path, against the rectangle-kernel formula), float32 theta under bf16,
save/load, learning a known dictionary."""

import numpy as np
import pytest
import torch

from sae import SAEConfig, get, load_sae
from sae.jumprelu import JumpReLUSAE, step
from tests.sae.synthetic import feature_recovery, fit, heldout_fvu, make_sparse_data

# d_in = 3, d_sae = 4; rows are latents (the W_enc parameter is the transpose, [d_in, d_sae]).
W_ENC_ROWS = [[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]]
B_ENC = [0.0, -1, 0.5, -2]
THETA = [2.6, 0.5, 1.5, 1.0]
W_DEC = [[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0.6, 0.8, 0]]
B_DEC = [0.5, 0, -0.5]
SCALE = 2.0
X_RAW = [[1.5, 1.0, 0.25], [0.0, -1.0, 1.0]]
# normalised x = [[3, 2, .5], [0, -2, 2]]; pi = W_enc (x - b_dec) + b_enc = [[2.5, 1, 1.5, 3.5], [-.5, -3, 3, -2]]
# f = pi 1[pi > theta]: 2.5 < 2.6 is cut although positive; 1.5 = theta is cut (strict inequality)
F_HAND = [[0.0, 1.0, 0.0, 3.5], [0.0, 0.0, 3.0, 0.0]]
# xhat = b_dec + f W_dec = [.5 + 2.1, 1 + 2.8, -.5]; [.5, 0, -.5 + 3]
XHAT_NORM = [[2.6, 3.8, -0.5], [0.5, 0.0, 2.5]]


def hand_model() -> JumpReLUSAE:
    model = JumpReLUSAE(SAEConfig(type="jumprelu", hidden_size=3, latent_size=4, k=1))
    with torch.no_grad():
        model.W_enc.copy_(torch.tensor(W_ENC_ROWS).T)
        model.b_enc.copy_(torch.tensor(B_ENC))
        model.threshold.copy_(torch.tensor(THETA))
        model.W_dec.copy_(torch.tensor(W_DEC))
        model.b_dec.copy_(torch.tensor(B_DEC))
    model.set_input_scale(SCALE)
    return model


def test_registered_under_both_names():
    assert get("jumprelu") is JumpReLUSAE and get("JumpReLUSAE") is JumpReLUSAE


def test_threshold_starts_at_the_config_value():
    model = JumpReLUSAE(SAEConfig(type="jumprelu", hidden_size=3, latent_size=4, k=1, threshold=0.25))
    assert model.threshold.dtype == torch.float32 and torch.equal(model.threshold, torch.full((4,), 0.25))


def test_hand_built_encode_decode_and_loss():
    model = hand_model()
    x = torch.tensor(X_RAW)
    assert torch.equal(model.encode(x), torch.tensor(F_HAND))
    assert torch.allclose(model.decode(torch.tensor(F_HAND)), torch.tensor(XHAT_NORM) / SCALE, atol=1e-6)
    out = model(x)
    assert torch.allclose(out["sae_out"], torch.tensor(XHAT_NORM), atol=1e-6)
    terms = model.loss(out, l1_coefficient=0.1)
    # errors xhat - x: [-.4, 1.8, -1] -> 4.4 and [.5, 2, .5] -> 4.5; active latents 2 and 1
    assert terms["mse"].item() == pytest.approx(4.45, rel=1e-6)
    assert terms["l0"].item() == pytest.approx(1.5)
    assert terms["total"].item() == pytest.approx(4.45 + 0.1 * 1.5, rel=1e-6)


# Gradient set-up: d_in = d_sae = 4, W_enc = I, b_enc = b_dec = 0, scale 1, so pi = x exactly.
# Window |pi - theta| < eps/2 = 0.1; "in" marks points inside it (above or below the threshold).
EPS = 0.2
THETA_G = [0.5, 0.5, 1.0, 0.2]
PI = [
    [0.45, 0.58, 1.20, 0.25],  # in (below), in (above), out, in (above)
    [0.62, 0.30, 0.95, 0.12],  # out, out, in (below), in (below)
    [0.55, 0.41, 1.06, 0.50],  # in (above), in (below), in (above), out
]
W_DEC_G = [[0.5, -1.0, 0.2, 0.0], [1.0, 0.3, 0.0, -0.4], [0.0, 0.7, 1.0, 0.1], [-0.6, 0.0, 0.4, 0.9]]


def grad_model() -> JumpReLUSAE:
    model = JumpReLUSAE(SAEConfig(type="jumprelu", hidden_size=4, latent_size=4, k=1, bandwidth=EPS))
    with torch.no_grad():
        model.W_enc.copy_(torch.eye(4))
        model.threshold.copy_(torch.tensor(THETA_G))
        model.W_dec.copy_(torch.tensor(W_DEC_G))
    return model


def _kernel(pi: np.ndarray, theta: np.ndarray) -> np.ndarray:
    return (np.abs((pi - theta) / EPS) < 0.5).astype(float)


def test_threshold_gradient_through_f_is_the_rectangle_pseudo_derivative():
    model = grad_model()
    model.loss(model(torch.tensor(PI)))["mse"].backward()
    pi, theta, w_dec = np.array(PI), np.array(THETA_G), np.array(W_DEC_G)
    f = pi * (pi > theta)
    g = 2.0 / len(PI) * (f @ w_dec - pi) @ w_dec.T  # d mse / d f, [B, M]
    # df/dtheta := -(theta/eps) K((pi - theta)/eps), summed over tokens
    expected_theta = (g * -(theta / EPS) * _kernel(pi, theta)).sum(axis=0)
    assert np.count_nonzero(expected_theta) == 4  # every latent has a point in its window
    assert np.allclose(model.threshold.grad.numpy(), expected_theta, atol=1e-5)
    # df/dpi = H(pi - theta): b_enc receives g where the latent is active
    assert np.allclose(model.b_enc.grad.numpy(), (g * (pi > theta)).sum(axis=0), atol=1e-5)


def test_threshold_gradient_through_l0_and_none_into_pi():
    model = grad_model()
    model.loss(model(torch.tensor(PI)), l1_coefficient=1.0)["l0"].backward()
    pi, theta = np.array(PI), np.array(THETA_G)
    # dH/dtheta := -(1/eps) K((pi - theta)/eps), averaged over tokens (l0 is a per-token mean)
    expected = (-(1.0 / EPS) * _kernel(pi, theta)).mean(axis=0)
    assert np.allclose(expected, [-5.0 * 2 / 3] * 4)  # each latent has 2 of its 3 points in the window
    assert np.allclose(model.threshold.grad.numpy(), expected, atol=1e-5)
    # dH/dpi := 0, so nothing upstream of pi learns from the L0 term
    for name in ("W_enc", "b_enc", "b_dec", "W_dec"):
        grad = getattr(model, name).grad
        assert grad is None or torch.count_nonzero(grad) == 0, name
    # and on its own: the step function sends zero gradient into its input
    pre = torch.tensor(PI, requires_grad=True)
    theta = torch.tensor(THETA_G, requires_grad=True)
    step(pre, theta, EPS).sum().backward()
    assert pre.grad is None or torch.count_nonzero(pre.grad) == 0
    assert torch.allclose(theta.grad, torch.tensor(expected * len(PI), dtype=torch.float32))


def test_theta_stays_float32_under_bf16():
    model = hand_model()
    theta = model.threshold
    before = theta.detach().clone()
    model.to(torch.bfloat16)
    assert model.threshold is theta  # the same Parameter object: an optimiser built earlier still holds it
    assert theta.dtype == torch.float32 and torch.equal(theta.detach(), before)
    assert model.W_enc.dtype == torch.bfloat16 and model.b_dec.dtype == torch.bfloat16
    model.half()
    assert theta.dtype == torch.float32 and torch.equal(theta.detach(), before)
    model.float()
    assert torch.equal(theta.detach(), before)


def test_bf16_model_compares_against_the_exact_float32_theta():
    # theta = 1.1 rounds to 1.1015625 in bf16; pi = 1.1015625 is exact in bf16 and lies above 1.1
    cfg = SAEConfig(type="jumprelu", hidden_size=2, latent_size=2, k=1, threshold=1.1, bandwidth=0.01)
    model = JumpReLUSAE(cfg)
    with torch.no_grad():
        model.W_enc.copy_(torch.eye(2))
    model.to(torch.bfloat16)
    out = model(torch.tensor([[1.1015625, 0.0]]))
    assert out["feature_acts"].dtype == torch.bfloat16
    assert out["feature_acts"][0, 0].item() == 1.1015625
    model.loss(out, l1_coefficient=1.0)["total"].backward()
    # pi - theta = 0.0015625 is inside the window (eps/2 = 0.005): theta learns, in float32
    assert model.threshold.grad.dtype == torch.float32 and model.threshold.grad[0] != 0


def test_update_after_step_keeps_theta_non_negative():
    model = hand_model()
    with torch.no_grad():
        model.threshold.copy_(torch.tensor([-0.3, 0.2, -1e-6, 1.0]))
    model.update_after_step({})
    assert torch.equal(model.threshold.detach(), torch.tensor([0.0, 0.2, 0.0, 1.0]))


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="bandwidth"):
        JumpReLUSAE(SAEConfig(type="jumprelu", hidden_size=3, latent_size=4, k=1, bandwidth=0.0))
    with pytest.raises(ValueError, match="threshold"):
        JumpReLUSAE(SAEConfig(type="jumprelu", hidden_size=3, latent_size=4, k=1, threshold=-0.1))


def test_save_load_identical(tmp_path):
    torch.manual_seed(1)
    model = JumpReLUSAE(SAEConfig(type="jumprelu", hidden_size=8, latent_size=16, k=1, bandwidth=0.05))
    with torch.no_grad():
        model.b_enc.normal_(0.0, 0.3)
        model.b_dec.normal_(0.0, 0.3)
        model.threshold.uniform_(0.0, 0.5)
    model.set_input_scale(2.0)
    model.save(tmp_path / "sae")
    loaded, _ = load_sae(tmp_path / "sae")
    assert type(loaded) is JumpReLUSAE and loaded.cfg.bandwidth == 0.05
    assert loaded.threshold.dtype == torch.float32 and torch.equal(loaded.threshold, model.threshold)
    x = torch.randn(32, 8)
    for key, value in model(x).items():
        assert torch.equal(loaded(x)[key], value), key


@pytest.fixture
def one_thread():
    """Small GEMMs on 2 shared cores: a second OpenMP thread only spins (10x slower under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_learns_a_known_dictionary(one_thread):
    """512 true unit features in d=64, 4 active per sample: a 640-latent SAE recovers them, and
    the L0 penalty raises the thresholds."""
    x, dictionary = make_sparse_data(40_000, seed=0)
    cfg = SAEConfig(type="jumprelu", hidden_size=64, latent_size=640, k=1, threshold=0.1, bandwidth=0.1)
    model = JumpReLUSAE(cfg)
    fit(model, x[:32_768], steps=1000, lr=2e-3, l1_coefficient=0.05)
    held_out = x[32_768:]
    fvu = heldout_fvu(model, held_out)
    recovered = feature_recovery(model.W_dec, dictionary)
    with torch.no_grad():
        l0 = (model.encode(held_out) != 0).float().sum(dim=1).mean().item()
    assert fvu < 0.1, fvu
    assert recovered >= 0.8, recovered
    assert l0 < 640 / 3, l0
    assert model.threshold.min().item() > 0.1 and model.threshold.mean().item() > 0.2  # every theta rose from 0.1
