"""Verified reads: a flipped byte in a shard stops training (and evaluation) with one line naming the
shard and `cache verify`; `training.verify_reads=false` reads it anyway."""

from __future__ import annotations

import threading

import pytest

import cache
from tests.train.cache_fixtures import write_cache
from tests.train.run_fixtures import TINY, tiny_config
from train.run import train, user_errors


def _flip_a_byte(cache_path, shard_name):
    """One bit of one stored value, past the safetensors header (or in a zarr chunk file)."""
    target = cache_path / shard_name
    if target.is_dir():  # zarr: the largest file is a layer's chunk
        target = max((p for p in target.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    data[len(data) - 40] ^= 0x40
    target.write_bytes(bytes(data))


@pytest.mark.parametrize("backend", ["safetensors", "zarr"])
def test_a_flipped_byte_stops_training_naming_the_shard(tmp_path, backend):
    path = write_cache(tmp_path / "c", content="sparse", backend=backend, **TINY).path
    shard = cache.open(path).shards("train")[2].name
    _flip_a_byte(path, shard)
    with pytest.raises(cache.DamagedShardError) as info:
        train(tiny_config(path, tmp_path / "runs", steps=20))
    message = str(info.value)
    assert f"shard {shard} of {path} does not match its checksum" in message
    assert f"python -m cache verify {path}" in message and "\n" not in message
    assert isinstance(info.value, user_errors())  # the CLI prints the line, no traceback
    # For a cache verified elsewhere the check can be turned off: it then trains on what is there.
    result = train(tiny_config(path, tmp_path / "runs", run_name="unchecked", steps=20, verify_reads=False))
    assert result.state.step == 20


def test_every_shard_is_hashed_once_per_process(tmp_path, monkeypatch):
    path = write_cache(tmp_path / "c", content="sparse", **TINY).path
    import cache.reader as reader_mod
    import cache.validity as validity_mod

    hashed, threads = [], {}
    real = validity_mod.hash_shard  # the verified read hashes through the one validity module

    def spy(p):
        hashed.append(p.name)
        threads[p.name] = threading.current_thread().name
        return real(p)

    monkeypatch.setattr(validity_mod, "hash_shard", spy)
    monkeypatch.setattr(reader_mod, "MAX_OPEN_SHARDS", 1)  # evictions reopen maps, not hashes
    train(tiny_config(path, tmp_path / "runs", steps=40))
    c = cache.open(path)
    assert sorted(hashed) == sorted(s.name for split in ("train", "heldout") for s in c.shards(split))
    # training's reads hash on the loader's background thread, overlapping the steps
    assert {threads[s.name] for s in c.shards("train")} == {"ActivationLoader"}
