"""RouteSAE and RouteMatryoshkaSAE: routing computed here by hand, shapes, splicing, learning."""

import pytest
import torch

from sae import SAEConfig
from sae.route import RouteMatryoshkaSAE, RouteSAE
from sae.topk import TopKSAE
from tests.sae.synthetic import feature_recovery, fit, heldout_fvu, make_multilayer_data, single_thread

SCALES = torch.tensor([1.0, 0.5, 2.0])


def routed(routing: str = "hard", aggre: str = "sum", n_layers: int = 3, impl: str = "sparse") -> RouteSAE:
    torch.manual_seed(6)
    cfg = SAEConfig(type="route", hidden_size=8, latent_size=32, k=3, n_layers=n_layers, routing=routing,
                    aggre=aggre, decode_impl=impl)
    model = RouteSAE(cfg)
    model.set_input_scale(SCALES[:n_layers])
    return model


def expected_probs(model: RouteSAE, x: torch.Tensor, aggre: str) -> tuple[torch.Tensor, torch.Tensor]:
    xn = x * SCALES[None, :, None]
    v = xn.sum(dim=1) if aggre == "sum" else xn.mean(dim=1)
    logits = v @ model.router.weight.detach().T
    return torch.exp(logits) / torch.exp(logits).sum(dim=1, keepdim=True), xn


@pytest.mark.parametrize("aggre", ["sum", "mean"])
def test_hard_routing_picks_argmax_and_scales_by_p(aggre):
    model = routed("hard", aggre)
    x = torch.randn(20, 3, 8)
    out = model(x)
    p, xn = expected_probs(model, x, aggre)
    best = p.argmax(dim=1)
    assert torch.allclose(out["router_probs"], p, atol=1e-6)
    assert torch.equal(out["layer_idx"], best)
    assert torch.equal(out["layer_weights"], torch.nn.functional.one_hot(best, 3).float())
    for b in range(20):
        assert torch.allclose(out["target"][b], p[b, best[b]] * xn[b, best[b]], atol=1e-6)


def test_soft_routing_mixes_layers_by_p():
    model = routed("soft")
    x = torch.randn(20, 3, 8)
    out = model(x)
    p, xn = expected_probs(model, x, "sum")
    mix = sum(p[:, i : i + 1] * xn[:, i] for i in range(3))
    assert torch.allclose(out["target"], mix, atol=1e-6)
    assert torch.allclose(out["layer_weights"], p, atol=1e-6)


def test_router_size_is_the_layer_count_and_a_mismatch_raises():
    model = routed(n_layers=3)
    assert model.router.weight.shape == (3, 8)
    assert model.input_scale.shape == (3,)
    with pytest.raises(ValueError, match=r"\[\.\.\., n_layers, d_in\] = \[\.\.\., 3, 8\].*\(5, 4, 8\)"):
        model(torch.randn(5, 4, 8))
    with pytest.raises(ValueError, match="n_layers"):
        model(torch.randn(5, 8))
    with pytest.raises(ValueError, match="base_sae_type"):
        RouteSAE(SAEConfig(type="route", hidden_size=8, latent_size=32, n_layers=3, base_sae_type="matryoshka"))
    with pytest.raises(ValueError, match="base_sae_type"):
        RouteMatryoshkaSAE(SAEConfig(type="route_matryoshka", hidden_size=8, latent_size=32, n_layers=3,
                                     group_sizes=[8, 24], base_sae_type="topk"))
    implied = RouteMatryoshkaSAE(SAEConfig(type="route_matryoshka", hidden_size=8, latent_size=32, n_layers=3,
                                           group_sizes=[8, 24]))
    assert implied.cfg.base_sae_type == "matryoshka"  # unset: the type's own, recorded in sae.json


def test_router_learns_through_p_under_hard_routing():
    model = routed("hard")
    model.loss(model(torch.randn(20, 3, 8)))["total"].backward()
    assert model.router.weight.grad is not None and model.router.weight.grad.abs().sum() > 0


def test_reconstruct_routed_splices_the_unscaled_layer_in_raw_units():
    model = routed("hard").eval()
    x = torch.randn(20, 3, 8)
    recon, idx = model.reconstruct_routed(x)
    p, _ = expected_probs(model, x, "sum")
    assert torch.equal(idx, p.argmax(dim=1))
    # the same weights as a single-layer TopK SAE on each chosen layer's raw activation
    single = TopKSAE(SAEConfig(type="topk", hidden_size=8, latent_size=32, k=3))
    shared = ("W_enc", "b_enc", "W_dec", "b_dec")
    single.load_state_dict({k: v for k, v in model.state_dict().items() if k in shared}, strict=False)
    for layer in range(3):
        rows = idx == layer
        if rows.any():
            single.set_input_scale(SCALES[layer])
            assert torch.allclose(recon[rows], single.reconstruct(x[rows, layer]), atol=1e-5)
    assert torch.equal(model.reconstruct(x)[0], recon)


def test_b_dec_is_initialised_from_x_route():
    model = RouteMatryoshkaSAE(SAEConfig(type="route_matryoshka", hidden_size=8, latent_size=32, n_layers=3,
                                         group_sizes=[8, 24], base_sae_type="matryoshka"))
    model.set_input_scale(SCALES)
    x = torch.randn(500, 3, 8) + torch.tensor([3.0, -1.0, 0.5])[None, :, None]
    model.init_from_data(x)
    with torch.no_grad():
        x_route = model(x)["target"]
    # the geometric median minimises the summed distance: no small step improves on it
    cost = lambda m: (x_route - m).norm(dim=1).sum()  # noqa: E731
    best = cost(model.b_dec.detach())
    for _ in range(20):
        assert cost(model.b_dec.detach() + 0.01 * torch.randn(8)) >= best - 1e-4


@pytest.mark.parametrize(
    "cls,k,steps,extra",
    [
        (RouteSAE, 4, 600, {}),
        (RouteMatryoshkaSAE, 2, 700, {"group_sizes": [128, 384, 512], "base_sae_type": "matryoshka"}),
    ],
    ids=["route", "route_matryoshka"],
)
def test_routed_sae_learns_known_dictionary(cls, k, steps, extra):
    x, dictionary = make_multilayer_data(40_000, n_layers=3, d=64, n_features=512, active=2, seed=0)
    torch.manual_seed(0)
    cfg = SAEConfig(type=cls.type_name, hidden_size=64, latent_size=1024, k=k, n_layers=3, routing="hard", **extra)
    model = cls(cfg)
    with single_thread():
        fit(model, x[:36_000], steps=steps, lr=5e-3, decay_fraction=0.3)
        fvu, recovery = heldout_fvu(model, x[36_000:]), feature_recovery(model.W_dec, dictionary)
    print(f"{cls.type_name} (hard routing): FVU of x_route {fvu:.3f}, recovery {recovery:.3f}")
    assert fvu < 0.1 and recovery >= 0.8
