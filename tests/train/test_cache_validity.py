"""Training refuses what `cache verify` refuses, first, by file and by what is wrong, and leaves no run
folder behind (issue 17): rows that disagree with the tensors, non-finite values in a training or a
held-out shard (checksums consistent), told apart from a non-finite loss on finite inputs."""

from __future__ import annotations

import pytest

import cache
from tests.cache.damage import move_rows, put_float32
from tests.train.cache_fixtures import write_cache
from tests.train.run_fixtures import tiny_config
from train.__main__ import main as train_main
from train.run import train, user_errors

SMALL = dict(d_model=8, n_train=600, n_heldout=200, layers=(0, 1), shard_rows=150, seq_len=16, window_seqs=4)


def _cli(path, out, capsys, *over: str) -> tuple[int, str]:
    code = train_main(["--model", "vanilla", "--cache", str(path), f"training.output_dir={out}",
                       "training.run_name=run", "training.steps=4", "training.batch_size=64",
                       "training.checkpoint_every=2", "training.shuffle_buffer_rows=512", "training.dtype=float32",
                       "model.latent_size=32", "model.layer=1", *over])
    return code, capsys.readouterr().err


def test_rows_that_disagree_with_the_tensors_are_refused_by_verify_and_at_open(tmp_path, capsys):
    path = write_cache(tmp_path / "c", content="sparse", **SMALL).path
    first, _second = move_rows(path, "train", 0, 1, 10)  # totals and statistics still add up
    problems = cache.verify(path)
    assert problems and problems[0] == (f"shard {first}: has tensor 'layer.0' of 150 rows, where the manifest "
                                         "says 140 rows")
    code, err = _cli(path, tmp_path / "runs", capsys)
    assert code == 1
    line = err.strip().splitlines()[-1]
    assert "\n" not in line and "Traceback" not in line
    assert f"shard {first} of {path} has tensor 'layer.0' of 150 rows" in line and "cache verify" in line
    assert not (tmp_path / "runs" / "run").exists()  # refused before the run folder is made


def test_inf_in_a_training_shard_is_named_as_such_not_as_a_learning_rate_problem(tmp_path, capsys):
    path = write_cache(tmp_path / "c", content="sparse", **SMALL).path
    shard = put_float32(path, "train", 2, 1, {5: float("inf"), 77: float("inf"), 300: float("-inf")})
    assert cache.verify(path) == [f"shard {shard}: holds 3 non-finite values (NaN or inf) in split train, layer 1: "
                                  "no SAE can train or be measured on them"]
    code, err = _cli(path, tmp_path / "runs", capsys)
    assert code == 1
    line = err.strip().splitlines()[-1]
    assert "\n" not in line and "lr" not in line and "loss" not in line
    assert f"shard {shard} of {path} holds 3 non-finite values (NaN or inf) in split train, layer 1" in line
    assert not (tmp_path / "runs" / "run").exists()  # the first batch was refused: no empty folder is left
    # A layer the run does not read is not its concern (verify still reports it).
    code, err = _cli(path, tmp_path / "runs", capsys, "model.layer=0")
    assert code == 0, err


def test_nan_in_a_heldout_shard_fails_the_run_instead_of_a_nan_fvu(tmp_path):
    path = write_cache(tmp_path / "c", content="sparse", **SMALL).path
    shard = put_float32(path, "heldout", 1, 1, {9: float("nan")})
    assert cache.verify(path) == [f"shard {shard}: holds 1 non-finite values (NaN or inf) in split heldout, "
                                  "layer 1: no SAE can train or be measured on them"]
    with pytest.raises(cache.DamagedShardError, match=f"shard {shard} of .* in split heldout, layer 1") as info:
        train(tiny_config(path, tmp_path / "runs", steps=4, batch_size=64, **{"model.layer": 1}))
    assert isinstance(info.value, user_errors())
    assert (tmp_path / "runs" / "run" / "sae").is_dir()  # the trained SAE is kept; only its measurement failed


def test_verify_reads_off_reads_past_the_values_check_too(tmp_path):
    """training.verify_reads=false trusts the cache's bytes (the checksum and the finiteness check are
    both skipped); the structure is still checked at open, which costs no read of the activations."""
    path = write_cache(tmp_path / "c", content="sparse", **SMALL).path
    put_float32(path, "heldout", 0, 1, {0: float("nan")})
    result = train(tiny_config(path, tmp_path / "runs", steps=4, batch_size=64, verify_reads=False,
                               **{"model.layer": 1}))
    assert result.summary["heldout"]["fvu"] != result.summary["heldout"]["fvu"]  # NaN: what was asked for


def test_verify_reads_off_a_non_finite_loss_from_the_cache_is_still_named(tmp_path):
    """Unchecked reads let an inf reach the loss; the stop then looks in the cache before advising on the
    learning rate, and names the shard."""
    path = write_cache(tmp_path / "c", content="sparse", **SMALL).path
    shard = put_float32(path, "train", 3, 1, {100: float("inf")})
    with pytest.raises(cache.NonFiniteValuesError, match=f"shard {shard} of .* in split train, layer 1"):
        train(tiny_config(path, tmp_path / "runs", steps=12, batch_size=64, verify_reads=False,
                          **{"model.layer": 1}))  # more than an epoch: the row is in some batch


def test_a_non_finite_loss_on_finite_inputs_keeps_the_learning_rate_advice(tmp_path, capsys):
    path = write_cache(tmp_path / "c", content="sparse", **SMALL).path
    code, err = _cli(path, tmp_path / "runs", capsys, "training.lr=1e30", "training.gradient_clip_norm=null")
    assert code == 1
    assert "loss is NaN or infinite" in err and "training.lr" in err


def test_each_layer_of_each_shard_is_checked_once_on_the_loader_thread(tmp_path, monkeypatch):
    """The values check costs one pass over the bytes a run reads, off the training thread."""
    import threading

    import cache.validity as validity_mod

    path = write_cache(tmp_path / "c", content="sparse", **SMALL).path
    checked: list[tuple[str, int, str]] = []
    real = validity_mod.layer_problem

    def spy(name, split, layer, reader, start, stop):
        checked.append((name, layer, threading.current_thread().name))
        return real(name, split, layer, reader, start, stop)

    monkeypatch.setattr(validity_mod, "layer_problem", spy)
    train(tiny_config(path, tmp_path / "runs", steps=30, batch_size=64, **{"model.layer": 1}))  # 3 epochs
    c = cache.open(path)
    train_shards = [s.name for s in c.shards("train")]
    assert sorted(n for n, _L, _t in checked if n.startswith("train")) == sorted(train_shards)
    assert {(L, t) for n, L, t in checked if n.startswith("train")} == {(1, "ActivationLoader")}
    assert sorted(n for n, _L, _t in checked if n.startswith("heldout")) == [s.name for s in c.shards("heldout")]
