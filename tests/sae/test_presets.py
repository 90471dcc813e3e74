"""The TopK-family presets in configs/sae/ load through the project's config loader and build their SAE."""

from pathlib import Path

import pytest

from sae import SAEConfig, get, registry
from settings.load import load_config
from train.__main__ import config_files

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["topk", "batchtopk", "matryoshka", "route", "route_matryoshka"])
def test_preset_builds_its_sae(name):
    files, overrides = config_files(name, ROOT / "configs" / "default.yaml")  # as `make train MODEL=name` does
    cfg = load_config(files, overrides)
    m = cfg.model
    assert registry.canonical(m.type) == registry.canonical(name)
    routed = name.startswith("route")
    base = m.base_sae_type or getattr(get(m.type), "base_sae_type", "topk")  # unset: the type's own
    sae_cfg = SAEConfig(type=m.type, hidden_size=384, latent_size=m.latent_size, k=m.k, group_sizes=m.group_sizes,
                        base_sae_type=base, routing=m.routing, aggre=m.aggre, n_layers=6 if routed else 1,
                        decode_impl=m.decode_impl)
    model = get(m.type)(sae_cfg)
    assert model.routed == routed and model.d_sae == m.latent_size
    assert cfg.training.l1_coefficient == 0.0 and cfg.training.lr > 0
