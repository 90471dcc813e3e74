"""MatryoshkaSAE: the nested loss against prefix reconstructions computed here, groups, learning."""

import pytest
import torch

from sae import SAEConfig
from sae.matryoshka import MatryoshkaSAE
from tests.sae.synthetic import feature_recovery, fit, heldout_fvu, make_sparse_data, single_thread

GROUPS = [8, 24, 32]


def small_model(impl: str) -> MatryoshkaSAE:
    torch.manual_seed(5)
    cfg = SAEConfig(type="matryoshka", hidden_size=16, latent_size=64, k=4, group_sizes=GROUPS, decode_impl=impl)
    model = MatryoshkaSAE(cfg)
    with torch.no_grad():
        model.b_dec.copy_(torch.randn(16) * 0.1)
        model.b_enc.copy_(torch.randn(64) * 0.1)
    model.set_input_scale(1.5)
    return model


@pytest.mark.parametrize("impl", ["sparse", "dense"])
def test_loss_is_the_sum_of_prefix_reconstructions(impl):
    model = small_model(impl)
    x = torch.randn(40, 16)
    terms = model.loss(model(x))
    # independently: BatchTopK over the batch, then each prefix decoded on its own
    with torch.no_grad():
        xn = x * 1.5
        a = torch.relu((xn - model.b_dec) @ model.W_enc.T + model.b_enc)
        cut = a.reshape(-1).topk(4 * 40).values[-1]
        f = a * (a >= cut)
        expected = []
        for m in torch.tensor(GROUPS).cumsum(0).tolist():
            x_hat = model.b_dec + f[:, :m] @ model.W_dec[:m]
            expected.append(((xn - x_hat) ** 2).sum(dim=1).mean())
    for i, e in enumerate(expected):
        assert terms[f"mse_prefix_{i}"].item() == pytest.approx(e.item(), rel=1e-5)
    assert terms["mse"].item() == pytest.approx(expected[-1].item(), rel=1e-5)
    assert terms["total"].item() == pytest.approx(sum(expected).item(), rel=1e-5)  # no dead latents: no AuxK
    assert terms["auxk"].item() == 0.0


def test_group_sizes_are_validated():
    with pytest.raises(ValueError, match="sum to 60.*latent_size is 64"):
        SAEConfig(type="matryoshka", hidden_size=16, latent_size=64, group_sizes=[8, 20, 32]).validate()
    with pytest.raises(ValueError, match="group_sizes"):
        MatryoshkaSAE(SAEConfig(type="matryoshka", hidden_size=16, latent_size=64))
    with pytest.raises(ValueError, match="positive"):
        SAEConfig(type="matryoshka", hidden_size=16, latent_size=64, group_sizes=[0, 64]).validate()


def test_prefix_inference_keeps_only_the_first_groups():
    model = small_model("sparse")
    model.threshold.fill_(0.05)
    model.eval()
    x = torch.randn(30, 16)
    full = model.encode(x)
    first = model.encode(x, active_groups=1)
    assert torch.equal(first[:, :8], full[:, :8]) and (first[:, 8:] == 0).all()
    assert torch.equal(model.encode(x, active_groups=3), full)
    with pytest.raises(ValueError, match="1..3"):
        model.encode(x, active_groups=4)


def test_matryoshka_learns_known_dictionary():
    x, dictionary = make_sparse_data(40_000, d=64, n_features=512, active=2, seed=0)
    torch.manual_seed(0)
    cfg = SAEConfig(type="matryoshka", hidden_size=64, latent_size=1024, k=2, group_sizes=[128, 384, 512])
    model = MatryoshkaSAE(cfg)
    with single_thread():
        fit(model, x[:36_000], steps=800, lr=5e-3, decay_fraction=0.3)
        fvu, recovery = heldout_fvu(model, x[36_000:]), feature_recovery(model.W_dec, dictionary)
    print(f"Matryoshka: FVU {fvu:.3f}, recovery {recovery:.3f}")
    assert fvu < 0.1 and recovery >= 0.8
