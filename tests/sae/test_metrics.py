"""Metric definitions against independent computations written here."""

import math

import pytest
import torch

from sae.metrics import ReconAccumulator, density_histogram, explained_variance, fvu


def _data(n=300, d=6, m=10):
    x = torch.randn(n, d) * torch.linspace(0.5, 3, d) + 2.0
    x_hat = x + 0.3 * torch.randn(n, d)
    f = torch.relu(torch.randn(n, m) - 0.8)
    f[:, 3] = 0  # one dead latent
    f[:, 7] = torch.rand(n) + 0.1  # one latent that always fires
    return x, x_hat, f


def test_explained_variance_perfect_and_mean():
    x, _, _ = _data()
    assert explained_variance(x, x.clone()) == pytest.approx(1.0, abs=1e-12)
    assert explained_variance(x, x.mean(0).expand_as(x)) == pytest.approx(0.0, abs=1e-12)


def test_accumulated_batches_equal_whole_split_formulas():
    x, x_hat, f = _data()
    acc = ReconAccumulator(x.shape[1], f.shape[1])
    for i in range(0, len(x), 64):  # uneven last batch
        acc.update(x[i:i + 64], x_hat[i:i + 64], f[i:i + 64])
    r = acc.result(dense_threshold=0.1)
    xd, xhd, fd = x.double(), x_hat.double(), f.double()
    err = ((xd - xhd) ** 2).sum(1)
    total = ((xd - xd.mean(0)) ** 2).sum()
    assert r["tokens"] == len(x)
    assert r["mse"] == pytest.approx(float(err.mean()), rel=1e-10)
    assert r["fvu"] == pytest.approx(float(err.sum() / total), rel=1e-10)
    assert r["fvu"] == pytest.approx(fvu(x, x_hat), rel=1e-10)
    assert r["explained_variance"] == pytest.approx(1 - float(err.sum() / total), rel=1e-10)
    cos = torch.nn.functional.cosine_similarity(xd, xhd, dim=1).mean()
    assert r["cosine_similarity"] == pytest.approx(float(cos), rel=1e-10)
    assert r["l2_ratio"] == pytest.approx(float((xhd.norm(dim=1) / xd.norm(dim=1)).mean()), rel=1e-10)
    rrb = (xhd.norm(dim=1) ** 2).mean() / (xd * xhd).sum(1).mean()
    assert r["relative_reconstruction_bias"] == pytest.approx(float(rrb), rel=1e-10)
    assert r["l1"] == pytest.approx(float(fd.abs().sum(1).mean()), rel=1e-10)
    assert r["l0"] == pytest.approx(float((fd != 0).sum(1).double().mean()), rel=1e-10)
    # legacy: per-token, centred on each batch's own mean, then averaged over tokens
    legacy = []
    for i in range(0, len(x), 64):
        xb, hb = xd[i:i + 64], xhd[i:i + 64]
        legacy.append(1 - ((xb - hb) ** 2).sum(1) / ((xb - xb.mean(0)) ** 2).sum(1))
    assert r["explained_variance_legacy"] == pytest.approx(float(torch.cat(legacy).mean()), rel=1e-9)


def test_density_dead_dense_match_direct_count():
    x, x_hat, f = _data()
    acc = ReconAccumulator(x.shape[1], f.shape[1])
    acc.update(x[:100], x_hat[:100], f[:100])
    acc.update(x[100:], x_hat[100:], f[100:])
    counts = [sum(1 for t in range(len(f)) if f[t, j] != 0) for j in range(f.shape[1])]
    density = acc.density()
    for j, c in enumerate(counts):
        assert density[j].item() == pytest.approx(c / len(f))
    r = acc.result(dense_threshold=0.1)
    assert r["dead"] == sum(1 for c in counts if c == 0) >= 1
    assert r["dense"] == sum(1 for c in counts if c / len(f) > 0.1)
    assert r["dead_fraction"] == pytest.approx(r["dead"] / f.shape[1])
    hist = density_histogram(density, bins=5)
    assert hist["dead"] == r["dead"]
    assert sum(hist["counts"]) == f.shape[1] - r["dead"]


def test_empty_accumulator_is_a_clear_error():
    with pytest.raises(ValueError, match="no tokens"):
        ReconAccumulator(3, 4).result()


def test_fvu_of_constant_data_is_nan_not_a_crash():
    x = torch.ones(5, 3)
    assert math.isnan(fvu(x, x))
