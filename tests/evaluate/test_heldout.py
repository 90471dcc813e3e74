"""Streaming held-out metrics match a direct computation over the whole split."""

import pytest
import torch
from cache_fixtures import write_cache

import cache
from evaluate.heldout import heldout_metrics
from sae import SAEConfig
from sae.vanilla import VanillaSAE


def _sae(layer, d=8, m=16, groups=None):
    cfg = SAEConfig(type="vanilla", hidden_size=d, latent_size=m, k=4, layers=[layer], group_sizes=groups)
    sae = VanillaSAE(cfg)
    with torch.no_grad():
        sae.b_enc.fill_(-0.05)
    sae.set_input_scale(0.7)
    return sae


@pytest.fixture(scope="module")
def sparse_cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("c") / "cache", content="sparse", n_train=256, n_heldout=300,
                       layers=(0, 1), d_model=8, shard_rows=128, noise=0.05)


def test_streamed_metrics_equal_whole_split(sparse_cache):
    c = cache.open(sparse_cache.path)
    sae = _sae(1, groups=[4, 12])
    res = heldout_metrics(sae, c, batch_size=50, l1_coefficient=0.5)
    x = torch.cat([c.read("heldout", s.index, 1).clone() for s in c.shards("heldout")]).double()
    assert len(x) == 300
    s = 0.7
    w_enc, b_enc, w_dec, b_dec = (t.detach().double() for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    xn = x * s
    f = torch.relu((xn - b_dec) @ w_enc + b_enc)
    xh = f @ w_dec + b_dec
    err = ((xn - xh) ** 2).sum(1)
    m = res["metrics"]
    assert m["tokens"] == 300
    assert m["fvu"] == pytest.approx(float(err.sum() / ((xn - xn.mean(0)) ** 2).sum()), rel=1e-6)
    assert m["mse"] == pytest.approx(float(err.mean()), rel=1e-6)
    assert m["mse_raw"] == pytest.approx(float(((x - xh / s) ** 2).sum(1).mean()), rel=1e-5)
    assert m["l0"] == pytest.approx(float((f != 0).sum(1).double().mean()), rel=1e-6)
    assert m["dead"] == int(((f != 0).sum(0) == 0).sum())
    assert res["loss"]["total"] == pytest.approx(float(err.mean() + 0.5 * f.sum(1).mean()), rel=1e-5)
    assert res["feature_density"] == pytest.approx(((f != 0).double().mean(0)).tolist(), abs=1e-12)
    # Matryoshka prefixes: decode from the first m latents only
    first, full = res["matryoshka"]
    xh4 = f[:, :4] @ w_dec[:4] + b_dec
    fvu4 = ((xn - xh4) ** 2).sum() / ((xn - xn.mean(0)) ** 2).sum()
    assert first["prefix"] == 4 and first["fvu"] == pytest.approx(float(fvu4), rel=1e-6)
    assert first["l0"] == pytest.approx(float((f[:, :4] != 0).sum(1).double().mean()), rel=1e-6)
    assert full["prefix"] == 16 and full["fvu"] == pytest.approx(m["fvu"], rel=1e-6)


def test_max_tokens_limits_rows(sparse_cache):
    c = cache.open(sparse_cache.path)
    res = heldout_metrics(_sae(0), c, batch_size=64, max_tokens=150)
    assert res["metrics"]["tokens"] == 150


def test_layer_not_in_cache_is_named(sparse_cache):
    c = cache.open(sparse_cache.path)
    with pytest.raises(ValueError, match=r"block\(s\) \[5\]"):
        heldout_metrics(_sae(5), c)
