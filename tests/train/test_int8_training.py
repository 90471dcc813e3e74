"""Training on an 8-bit cache (issue 14): the loop takes packed batches (the GPU path: rows decoded on the
training device) and decoded ones (the CPU path) to the same SAE, bit for bit."""

from __future__ import annotations

import json

import torch

import cache
from tests.cache.cache_producer import write_cache
from tests.train.run_fixtures import tiny_config
from train.data import ActivationLoader
from train.run import activation_loader, train


def test_packed_and_decoded_batches_train_the_same_sae(tmp_path):
    write_cache(tmp_path / "c", "safetensors", n_train=20, dtype="int8")
    cfg = tiny_config(tmp_path / "c", tmp_path / "runs", "decoded", steps=12, **{"model.layer": 2})
    train(cfg, loader=activation_loader)
    packed_cfg = tiny_config(tmp_path / "c", tmp_path / "runs", "packed", steps=12, **{"model.layer": 2})

    def packed(data, choice, t):
        loader = ActivationLoader(data, choice.loader_layers, t.batch_size, seed=t.seed,
                                  buffer_rows=t.shuffle_buffer_rows, decode=False)
        assert loader.packed
        return loader

    train(packed_cfg, loader=packed)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "runs" / "decoded" / "sae" / "sae.safetensors"))
    b = load_file(str(tmp_path / "runs" / "packed" / "sae" / "sae.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert cache.open(tmp_path / "c").encoded
    assert json.loads((tmp_path / "runs" / "packed" / "train_summary.json").read_text())["steps"] == 12
