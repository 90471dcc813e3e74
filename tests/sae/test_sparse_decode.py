"""Sparse and dense paths agree in value and gradient to 1e-5 relative (float32), and each
sparse kernel matches its definition written out here."""

import pytest
import torch

from sae import SAEConfig, get, sparse_decode
from sae.selection import Selection, select_batch_topk, select_topk
from sae.sparse_decode import decode_selected, gather_preacts, scatter_rows

TOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def selections() -> list[Selection]:
    torch.manual_seed(7)
    z = torch.randn(12, 40)
    z[3] -= 10.0  # BatchTopK: row 3 keeps nothing (an empty bag)
    return [select_topk(z, 5), select_batch_topk(torch.relu(z), 5)]


@pytest.mark.parametrize("path", ["native", "native-fallback", "torch"])
@pytest.mark.parametrize("which", [0, 1], ids=["topk", "batchtopk"])
def test_decode_matches_definition_and_dense_path(which, path, monkeypatch):
    # "native": d vals from the C kernel where it builds; "native-fallback": the same Function with the
    # kernel unavailable; "torch": embedding_bag's own backward for d vals (CUDA's path)
    if path == "torch":
        monkeypatch.setattr(sparse_decode, "_native_decode_applies", lambda vals, w: False)
    elif path == "native-fallback":
        monkeypatch.setattr(sparse_decode, "_native_decode_applies", lambda vals, w: True)
        monkeypatch.setattr(sparse_decode.native, "gather_dot", lambda *a: None)
    elif not sparse_decode._native_decode_applies(torch.zeros(1), torch.zeros(1, 1)):
        pytest.skip("no C compiler: sae.native falls back to torch")
    sel = selections()[which]
    torch.manual_seed(8)
    w = torch.randn(40, 6, requires_grad=True)
    vals = torch.rand(sel.cols.numel(), requires_grad=True)
    g = torch.randn(12, 6)
    grads = {}
    for impl in ("sparse", "dense"):
        out = decode_selected(sel, vals, w, impl)
        gw, gv = torch.autograd.grad(out, (w, vals), g)
        grads[impl] = (out, gw, gv)
    # the definition, entry by entry
    ref = torch.zeros(12, 6)
    ref_gw = torch.zeros(40, 6)
    ref_gv = torch.zeros(sel.cols.numel())
    for n, (r, c) in enumerate(zip(sel.rows.tolist(), sel.cols.tolist(), strict=True)):
        ref[r] += vals[n].detach() * w[c].detach()
        ref_gw[c] += vals[n].detach() * g[r]
        ref_gv[n] = g[r] @ w[c].detach()
    for impl in ("sparse", "dense"):
        out, gw, gv = grads[impl]
        assert rel(out, ref) < TOL and rel(gw, ref_gw) < TOL and rel(gv, ref_gv) < TOL
    if which == 1:
        assert (grads["sparse"][0][3] == 0).all()
    # W_dec's gradient lives on the selected rows only
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[sel.cols] = False
    assert (grads["sparse"][1][untouched] == 0).all()


def test_scatter_rows_matches_definition():
    sel = selections()[1]
    torch.manual_seed(9)
    weights, source = torch.randn(sel.cols.numel()), torch.randn(12, 6)
    ref = torch.zeros(40, 6)
    for n, (r, c) in enumerate(zip(sel.rows.tolist(), sel.cols.tolist(), strict=True)):
        ref[c] += weights[n] * source[r]
    assert rel(scatter_rows(sel, weights, source), ref) < TOL


@pytest.mark.parametrize("kept_values", [False, True], ids=["indexed", "values-from-the-top-k"])
def test_gather_preacts_sparse_backward_matches_autograd(kept_values):
    torch.manual_seed(10)
    x_c = torch.randn(12, 6, requires_grad=True)
    w = torch.randn(40, 6, requires_grad=True)
    b = torch.randn(40, requires_grad=True)
    dense = torch.nn.functional.linear(x_c, w, b)
    with torch.no_grad():
        detached = torch.nn.functional.linear(x_c, w, b)
    # a top-k keeps the values it found (Selection.values); BatchTopK's selection does not
    sel = select_topk(detached, 5) if kept_values else selections()[1]
    assert (sel.values is not None) == kept_values
    g = torch.randn(sel.cols.numel())
    v_dense = gather_preacts(dense, sel, x_c, w, b)
    v_sparse = gather_preacts(detached, sel, x_c, w, b)
    assert torch.equal(v_dense, v_sparse)
    for gd, gs in zip(torch.autograd.grad(v_dense, (x_c, w, b), g), torch.autograd.grad(v_sparse, (x_c, w, b), g),
                      strict=True):
        assert rel(gs, gd) < TOL


def test_gather_preacts_centre_gets_the_gradient_x_c_would_have_passed_on():
    torch.manual_seed(12)
    x = torch.randn(12, 6)  # data: no gradient
    centre = torch.randn(6, requires_grad=True)
    w = torch.randn(40, 6, requires_grad=True)
    b = torch.randn(40, requires_grad=True)
    dense = torch.nn.functional.linear(x - centre, w, b)  # autograd's reference, x_c with its graph
    with torch.no_grad():
        x_c = x - centre
        detached = torch.nn.functional.linear(x_c, w, b)
    sel = select_topk(detached, 5)
    g = torch.randn(sel.cols.numel())
    v_dense = gather_preacts(dense, sel, x - centre, w, b)
    v_sparse = gather_preacts(detached, sel, x_c, w, b, centre=centre)
    assert torch.equal(v_dense, v_sparse)
    for gd, gs in zip(torch.autograd.grad(v_dense, (centre, w, b), g), torch.autograd.grad(v_sparse, (centre, w, b), g),
                      strict=True):
        assert rel(gs, gd) < TOL
    with pytest.raises(ValueError, match="centre"):
        gather_preacts(detached, sel, (x - centre), w, b, centre=centre)


FIVE = {
    "topk": {},
    "batchtopk": {},
    "matryoshka": {"group_sizes": [16, 48, 64]},
    "route": {"n_layers": 3},
    "route_matryoshka": {"n_layers": 3, "group_sizes": [16, 48, 64], "base_sae_type": "matryoshka"},
}


@pytest.mark.parametrize("kind", list(FIVE))
def test_model_sparse_and_dense_agree_in_loss_and_gradients(kind):
    torch.manual_seed(11)
    cfg = dict(type=kind, hidden_size=16, latent_size=128, k=4, aux_k=6, **FIVE[kind])
    models = {impl: get(kind)(SAEConfig(**cfg, decode_impl=impl)) for impl in ("sparse", "dense")}
    models["dense"].load_state_dict(models["sparse"].state_dict())
    n_layers = FIVE[kind].get("n_layers")
    x = torch.randn(48, n_layers, 16) if n_layers else torch.randn(48, 16)
    dead = torch.zeros(128, dtype=torch.bool)
    dead[::3] = True  # AuxK on: its gradient must agree too
    results = {}
    for impl, model in models.items():
        assert model.impl == impl
        with torch.no_grad():
            model.b_dec.copy_(torch.linspace(-0.5, 0.5, 16))  # so that b_dec's encoder-side gradient counts
        terms = model.loss(model(x, dense_acts=False), dead_mask=dead)
        terms["total"].backward()
        results[impl] = (terms, {n: p.grad.clone() for n, p in model.named_parameters()})
    (ts, gs), (td, gd) = results["sparse"], results["dense"]
    assert set(ts) == set(td) and td["auxk"] > 0
    for name in td:
        assert ts[name].item() == pytest.approx(td[name].item(), rel=TOL), name
    assert set(gs) == set(gd)
    for name in gd:
        assert rel(gs[name], gd[name]) < TOL, name


def test_kept_values_are_used_only_for_the_matrix_they_came_from():
    torch.manual_seed(12)
    z = torch.randn(6, 40)
    sel = select_topk(z.detach(), 5)  # the step selects on a detached alias of z
    assert sel.values_for(z) is sel.values
    x_c, w, b = torch.randn(6, 3), torch.randn(40, 3), torch.randn(40)
    other = torch.randn(6, 40)  # same shape, other values: read from it, not from the selection
    assert torch.equal(gather_preacts(other, sel, x_c, w, b), other[sel.rows, sel.cols])
    assert sel.values_for(z.clone()) is None
    z.mul_(2.0)  # modified in place after the selection: its values are stale
    assert sel.values_for(z) is None
    assert torch.equal(gather_preacts(z, sel, x_c, w, b), z[sel.rows, sel.cols])
    with torch.inference_mode():
        zi = torch.randn(6, 40)
        si = select_topk(zi, 5)
        assert si.values_for(zi) is si.values


def test_sparse_backward_refuses_a_second_derivative_and_its_output_may_be_modified_in_place():
    sel = selections()[0]
    torch.manual_seed(13)
    w = torch.randn(40, 6, requires_grad=True)
    vals = torch.rand(sel.cols.numel(), requires_grad=True)
    out = decode_selected(sel, vals, w, "sparse")
    (gw,) = torch.autograd.grad(out.pow(2).sum(), (w,), create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate"):
        gw.pow(2).sum().backward()  # W_dec's gradient depends on vals: not silently dropped
    out2 = decode_selected(sel, vals, w, "sparse")
    out2.add_(1.0)  # as embedding_bag's own output allows
    out2.sum().backward()
    assert w.grad is not None


def test_a_model_cast_to_bf16_keeps_its_bias_gradients_near_float64():
    # The per-latent sums behind b_enc's and b_dec's gradients (~B*k/M terms each) are float32 even
    # when the weights are bf16: summed in bf16 they were 38% off for b_enc.
    def grads(dtype):
        torch.manual_seed(0)
        m = get("topk")(SAEConfig(type="topk", hidden_size=64, latent_size=1024, k=32, decode_impl="sparse"))
        with torch.no_grad():
            m.b_dec.copy_(torch.linspace(-1, 1, 64))
        m = m.to(dtype)
        torch.manual_seed(1)
        x = (torch.randn(4096, 64) + 0.3).to(dtype)
        m.loss(m(x, dense_acts=False))["total"].backward()
        return {n: p.grad.double() for n, p in m.named_parameters()}

    ref, got = grads(torch.float64), grads(torch.bfloat16)
    for name in ("b_enc", "b_dec"):
        assert rel(got[name], ref[name]) < 2e-2, name
