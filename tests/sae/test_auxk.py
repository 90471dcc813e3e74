"""AuxK: only dead latents, the reference formula computed here, k_aux = min(aux_k, |D|), NaN-safety."""

import functools

import pytest
import torch

import sae.topk
from sae import SAEConfig
from sae.auxk import auxk_loss
from sae.topk import TopKSAE


@pytest.fixture(params=["dead-columns", "sync-free", "fused-encoder"], autouse=True)
def selection_path(request, monkeypatch):
    """Every test runs on each AuxK selection: the CPU's top-k over the dead columns of a kept z, the
    GPU's fixed-shape masked top-k (forced here on the CPU), and the dead latents' own GEMM where the
    forward kept no z (the trainer's `dense_acts=False` on the CPU's fused encoder)."""
    monkeypatch.setattr(sae.topk, "auxk_loss", functools.partial(auxk_loss, sync_free=request.param == "sync-free"))
    if request.param == "fused-encoder":  # in float32 here, where the trainer keeps z: forced
        monkeypatch.setattr(sae.topk, "FUSED_ENCODE_DTYPES", (torch.float32,))
        forward = TopKSAE.forward
        monkeypatch.setattr(TopKSAE, "forward", lambda self, x, dense_acts=True: forward(self, x, dense_acts=False))
    return request.param


def model_and_batch(impl: str = "sparse", aux_k: int = 3):
    torch.manual_seed(12)
    model = TopKSAE(SAEConfig(type="topk", hidden_size=8, latent_size=32, k=2, aux_k=aux_k, decode_impl=impl))
    with torch.no_grad():
        model.b_dec.copy_(torch.randn(8) * 0.2)
    model.set_input_scale(0.7)
    return model, torch.randn(24, 8)


def reference_auxk(model: TopKSAE, x: torch.Tensor, dead: torch.Tensor, k_aux: int) -> torch.Tensor:
    """Gao et al. §2.4 written out: z restricted to dead latents, ReLU of its per-token top k_aux,
    decoded without b_dec, against e = x - x_hat; normalised by the batch variance of e."""
    with torch.no_grad():
        xn = x * 0.7
        z = (xn - model.b_dec) @ model.W_enc.T + model.b_enc
        keep = z.topk(2, dim=1).indices
        f = torch.zeros_like(z).scatter(1, keep, z.gather(1, keep).relu())
        e = xn - (f @ model.W_dec + model.b_dec)
        dead_idx = dead.nonzero().flatten()
        zd = z[:, dead_idx]
        top = zd.topk(k_aux, dim=1)
        f_aux = torch.zeros_like(zd).scatter(1, top.indices, top.values.relu())
        e_hat = f_aux @ model.W_dec[dead_idx]
        return ((e - e_hat) ** 2).sum() / ((e - e.mean(dim=0)) ** 2).sum()


@pytest.mark.parametrize("impl", ["sparse", "dense"])
@pytest.mark.parametrize("n_dead,aux_k", [(10, 3), (2, 3)], ids=["k_aux=aux_k", "k_aux=|D|"])
def test_auxk_value_matches_reference(impl, n_dead, aux_k, selection_path):
    model, x = model_and_batch(impl, aux_k)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[torch.randperm(32)[:n_dead]] = True
    out = model(x)
    assert ("pre_acts" in out) == (impl == "dense" or selection_path != "fused-encoder")  # the path under test
    terms = model.loss(out, dead_mask=dead)
    ref = reference_auxk(model, x, dead, min(aux_k, n_dead))
    assert terms["auxk"].item() == pytest.approx(ref.item(), rel=1e-5)
    assert terms["total"].item() == pytest.approx((terms["mse"] + terms["auxk"] / 32).item(), rel=1e-6)


@pytest.mark.parametrize("impl", ["sparse", "dense"])
def test_auxk_gradient_reaches_only_dead_decoder_rows(impl):
    model, x = model_and_batch(impl)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[1, 5, 9, 20, 31]] = True
    model.loss(model(x), dead_mask=dead)["auxk"].backward()
    grad_rows = model.W_dec.grad.abs().sum(dim=1)
    assert (grad_rows[~dead] == 0).all()
    assert (grad_rows[dead] > 0).sum() >= 3
    assert (model.W_enc.grad.abs().sum(dim=1)[~dead] == 0).all()  # and only their encoder rows


def test_auxk_is_zero_without_dead_latents_and_nan_safe():
    model, x = model_and_batch()
    out = model(x)
    assert model.loss(out)["auxk"].item() == 0.0
    assert model.loss(out, dead_mask=torch.zeros(32, dtype=torch.bool))["auxk"].item() == 0.0
    same = model(torch.ones(6, 8))  # identical tokens: the residual has zero variance
    aux = model.loss(same, dead_mask=torch.ones(32, dtype=torch.bool))["auxk"]
    assert aux.item() == 0.0 and torch.isfinite(aux)
    with pytest.raises(ValueError, match=r"dead_mask must have shape \(32,\)"):
        model.loss(out, dead_mask=torch.zeros(31, dtype=torch.bool))
