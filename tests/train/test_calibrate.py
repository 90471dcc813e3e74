"""The batch-level SAEs' inference threshold after training: inference keeps about k per token."""

import pytest
import torch

import cache
from sae import SAEConfig, get
from tests.train.cache_fixtures import write_cache
from train.calibrate import calibration_batches


@torch.no_grad()
def _z(model, x):
    # Pre-activations computed here, independently of the SAE's own selection code.
    xn = x.float() * model.input_scale[0]
    return torch.nn.functional.linear(xn - model.b_dec, model.W_enc, model.b_enc)


@pytest.mark.parametrize("kind", ["batchtopk", "matryoshka"])
def test_calibrated_threshold_gives_k_per_token_on_training_rows(tmp_path, kind):
    write_cache(tmp_path / "c", content="gaussian", n_train=4096, n_heldout=256, layers=[0], d_model=16,
                shard_rows=512)
    c = cache.open(tmp_path / "c")
    k, batch = 4, 256
    extra = {"group_sizes": [16, 48]} if kind == "matryoshka" else {}
    model = get(kind)(SAEConfig(type=kind, hidden_size=16, latent_size=64, k=k, **extra))
    model.threshold.fill_(5.0)  # a stale estimate far above the cut-off
    report = model.calibrate(calibration_batches(c, 0, batch_size=batch))
    assert report is not None and report["before"] == 5.0 and report["batches"] == 8
    theta = float(model.threshold)
    # Independent check: on every training batch the calibrated theta keeps about k per token,
    # as the k*B-th largest pre-activation of that batch would.
    l0s, cuts = [], []
    for i in range(len(c.shards("train"))):
        z = _z(model, c.read("train", i, 0, 0, batch))
        cuts.append(float(z.flatten().topk(k * batch).values[-1]))
        l0s.append(float((z > theta).sum(dim=1).float().mean()))
    assert abs(sum(l0s) / len(l0s) - k) <= 0.1 * k
    assert min(cuts) <= theta <= max(cuts)
    model.eval()
    out = model(c.read("train", 0, 0, 0, batch))
    assert abs(float((out["feature_acts"] != 0).sum(dim=1).float().mean()) - k) <= 0.2 * k


def test_sae_without_batch_threshold_is_left_alone(tmp_path):
    write_cache(tmp_path / "c", content="gaussian", n_train=1024, n_heldout=128, layers=[0], d_model=16)
    c = cache.open(tmp_path / "c")
    model = get("jumprelu")(SAEConfig(type="jumprelu", hidden_size=16, latent_size=32, k=1))
    before = model.threshold.detach().clone()
    assert model.calibrate(calibration_batches(c, 0, batch_size=128)) is None
    assert torch.equal(model.threshold.detach(), before)
