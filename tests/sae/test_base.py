"""The shared contract in sae/base.py: config validation, type checks, geometric median, safe saving."""

import pytest
import torch

from sae import SAEConfig, load_sae
from sae.base import geometric_median
from sae.topk import TopKSAE

GOOD = {"type": "topk", "hidden_size": 8, "latent_size": 32}


@pytest.mark.parametrize(
    "change,message",
    [
        ({"k": "32"}, "'k' must be an integer"),
        ({"k": True}, "'k' must be an integer"),
        ({"latent_size": 32.0}, "'latent_size' must be an integer"),
        ({"aux_k_coef": float("nan")}, "'aux_k_coef' must be a finite number"),
        ({"group_sizes": [16, 16.0]}, "'group_sizes' must be a list of integers"),
        ({"aux_k": 0}, "aux_k=0 must be positive"),
        ({"threshold_momentum": 1.0}, r"threshold_momentum=1.0 must be in \[0, 1\)"),
        ({"decode_impl": "fast"}, "decode_impl must be"),
        ({"base_sae_type": "gated"}, "base_sae_type must be"),
        ({"k": 33}, "k=33 must be in 1..latent_size=32"),
        ({"layers": [3, 4]}, r"layers \[3, 4\] do not match n_layers=1"),
        ({"colour": "red"}, r"unknown SAE config keys \['colour'\]"),
    ],
)
def test_config_errors_name_the_key(change, message):
    with pytest.raises((TypeError, ValueError), match=message):
        SAEConfig.from_dict({**GOOD, **change})


def test_config_requires_its_keys():
    with pytest.raises(ValueError, match=r"lacks required keys \['latent_size'\]"):
        SAEConfig.from_dict({"type": "topk", "hidden_size": 8})


def test_a_class_refuses_another_types_config_and_records_its_own_name():
    with pytest.raises(ValueError, match="'batchtopk' is BatchTopKSAE, but it was given to TopKSAE"):
        TopKSAE(SAEConfig(**{**GOOD, "type": "batchtopk"}))
    assert TopKSAE(SAEConfig(**GOOD)).cfg.type == "TopKSAE"


def test_geometric_median_of_a_known_case():
    # three points at the origin and one far away: the median stays at the origin, the mean does not
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [10.0, 0.0]])
    assert torch.allclose(geometric_median(x), torch.zeros(2), atol=1e-3)
    # a symmetric cloud: its centre
    pts = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]) + torch.tensor([3.0, -2.0])
    assert torch.allclose(geometric_median(pts), torch.tensor([3.0, -2.0]), atol=1e-4)


def test_a_failed_save_leaves_the_previous_sae_intact(tmp_path):
    model = TopKSAE(SAEConfig(**GOOD))
    model.save(tmp_path / "sae")
    before = {p.name: p.read_bytes() for p in (tmp_path / "sae").iterdir()}
    with torch.no_grad():
        model.W_dec.add_(1.0)
    with pytest.raises(TypeError):
        model.save(tmp_path / "sae", meta={"bad": object()})  # not JSON: refused before writing
    assert {p.name: p.read_bytes() for p in (tmp_path / "sae").iterdir()} == before
    loaded, _ = load_sae(tmp_path / "sae")
    assert not torch.equal(loaded.W_dec, model.W_dec)


def test_the_decoder_constraint_removes_the_parallel_gradient_and_renormalises_rows():
    torch.manual_seed(4)
    model = TopKSAE(SAEConfig(type="topk", hidden_size=6, latent_size=10, k=2))
    w = model.W_dec.detach().clone()  # unit rows at init
    g = torch.randn(10, 6)
    model.W_dec.grad = g.clone()
    model.remove_parallel_grads()
    # g - (g . w_i) w_i for each unit row w_i, written out row by row
    want = torch.stack([g[i] - torch.dot(g[i], w[i]) * w[i] for i in range(10)])
    assert torch.allclose(model.W_dec.grad, want, atol=1e-6)
    assert (model.W_dec.grad * w).sum(dim=1).abs().max() < 1e-6
    with torch.no_grad():
        model.W_dec.mul_(torch.arange(1.0, 11.0)[:, None])
    model.normalize_decoder()
    assert torch.allclose(model.W_dec.detach(), w, atol=1e-6)
