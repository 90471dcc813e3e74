"""Evaluation refuses non-finite held-out values by shard, split and layer (issue 17), instead of an
eval.json whose FVU is null for a reason the user cannot see; the checksum of the shard holds."""

from cache_fixtures import write_cache

from evaluate.__main__ import main
from tests.cache.damage import put_float32
from tests.evaluate.test_run import make_run


def test_nan_in_a_heldout_shard_is_refused_by_name(tmp_path, capsys):
    c = write_cache(tmp_path / "cache", content="sparse", n_train=128, n_heldout=200, layers=(0, 1), d_model=8,
                    shard_rows=64, noise=0.05)
    run, _cfg = make_run(tmp_path, c.path)  # an SAE of layer 1
    shard = put_float32(c.path, "heldout", 1, 1, {3: float("nan"), 40: float("inf")})
    assert main([str(run), "--no-downstream"]) != 0  # (it was 0, with a null FVU in eval.json)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"shard {shard} of {c.path} holds 2 non-finite values (NaN or inf) in split heldout, layer 1" in err
    assert "cache verify" in err
    assert not (run / "eval.json").exists()
