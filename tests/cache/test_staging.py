"""The writer's device path (rows assembled where they arrive, statistics computed there, one staged copy to
the host), run on the CPU by treating it as the device: everything but the CUDA stream, event and pinning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cache
from cache import buffer, stats
from tests.cache.cache_producer import LAYERS, all_rows, new_writer, produce, write_cache


@pytest.fixture
def device_path(monkeypatch):
    monkeypatch.setattr(buffer, "assembles_on_device", lambda device: True)
    calls = []
    real = stats.device_row_sums

    def spy(x):
        calls.append(tuple(x.shape))
        return real(x)

    monkeypatch.setattr("cache.staging.device_row_sums", spy)
    return calls


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_staged_shards_round_trip_with_statistics_from_the_device(tmp_path, backend, dtype, device_path):
    write_cache(tmp_path / "c", backend, n_train=7, n_heldout=3, dtype=dtype, async_write=True, workers=2)
    assert device_path, "the shards did not go through the staging path"
    c = cache.open(tmp_path / "c")
    acts, _ = all_rows("train", 7)
    for layer in LAYERS:
        got = torch.cat([c.read("train", i, layer) for i in range(len(c.shards("train")))])
        assert torch.equal(got, acts[layer].to(getattr(torch, dtype)))
        x = got.double().numpy()
        norms = np.sqrt((x * x).sum(axis=1))
        s = c.stats("train", layer)
        assert np.abs(s.mean - x.mean(axis=0)).max() <= 1e-6 * norms.mean()
        assert abs(s.mean_norm - norms.mean()) <= 1e-6 * norms.mean()
        assert abs(s.mean_sq_norm - (norms ** 2).mean()) <= 1e-6 * (norms ** 2).mean()
    assert cache.verify(tmp_path / "c") == []


def test_staged_statistics_are_bitwise_equal_after_a_resume(tmp_path, backend, device_path):
    write_cache(tmp_path / "ref", backend, n_train=8, n_heldout=3, async_write=True)
    w = new_writer(tmp_path / "c", backend, async_write=True, workers=3, max_inflight=4)
    produce(w, "train", 4)
    w.close()  # buffered rows are dropped, as after a crash; emitted shards are committed
    w = new_writer(tmp_path / "c", backend, async_write=True)
    produce(w, "train", 8, start=w.resume_point("train"))
    produce(w, "heldout", 3, start=w.resume_point("heldout"))
    w.finish()
    ref, got = cache.open(tmp_path / "ref").manifest, cache.open(tmp_path / "c").manifest
    assert got["shards"] == ref["shards"] and got["stats"] == ref["stats"]


def test_staged_path_reuses_a_bounded_number_of_host_buffers(tmp_path, device_path):
    w = new_writer(tmp_path / "c", "safetensors", shard_rows=8, async_write=True, workers=2, max_inflight=2)
    produce(w, "train", 10)
    w.finish()
    stager = next(iter(w._stagers.values()))
    assert 1 <= stager.pinned._made <= 2 + 2  # in flight, plus one staged while the producer waits, per split
    assert cache.open(tmp_path / "c").num_rows("train") == all_rows("train", 10)[0][0].shape[0]
