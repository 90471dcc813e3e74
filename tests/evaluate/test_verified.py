"""Evaluation checks what it reads: a flipped byte in a held-out shard is refused by name."""

import pytest
from cache_fixtures import write_cache

import cache
from evaluate.__main__ import main
from evaluate.run import evaluate_run
from tests.evaluate.test_run import make_run


def test_a_damaged_heldout_shard_is_refused_by_name(tmp_path, capsys):
    c = write_cache(tmp_path / "cache", content="sparse", n_train=128, n_heldout=200, layers=(0, 1), d_model=8,
                    shard_rows=64, noise=0.05)
    run, cfg = make_run(tmp_path, c.path)
    shard = cache.open(c.path).shards("heldout")[1]
    data = bytearray((c.path / shard.name).read_bytes())
    data[-20] ^= 0x01
    (c.path / shard.name).write_bytes(bytes(data))
    with pytest.raises(cache.DamagedShardError, match=f"shard {shard.name} of .* does not match its checksum"):
        evaluate_run(run, cfg, downstream=False, plots=False, dashboard=False)
    assert main([str(run), "--no-downstream"]) != 0
    err = capsys.readouterr().err
    assert f"shard {shard.name}" in err and "cache verify" in err
