"""Checkpoints and the final sae/ carry checksums: a flipped byte in the newest checkpoint falls back to
the previous one with a note (and the run still ends bitwise equal to an uninterrupted one); a damaged
sae/ is refused by name, by load_sae and by `evaluate`."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from evaluate.__main__ import main as evaluate_main
from sae import load_sae
from tests.train.cache_fixtures import write_cache
from tests.train.run_fixtures import TINY, tiny_config
from train.checkpoint import CheckpointError, list_checkpoints, read_checkpoint
from train.run import train


class Killed(Exception):
    pass


def _flip(path, offset_from_end=24):
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= 0x10  # same size: only a checksum can tell
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("cache") / "c", content="sparse", **TINY).path


def test_a_flipped_byte_in_the_newest_checkpoint_falls_back_to_the_previous(tiny_cache, tmp_path):
    train(tiny_config(tiny_cache, tmp_path, "full"))

    def kill(state):
        if state.step == 25:
            raise Killed

    with pytest.raises(Killed):
        train(tiny_config(tiny_cache, tmp_path, "killed"), after_step=[kill])
    newest = list_checkpoints(tmp_path / "killed")[-1]
    assert newest.name == "step-00000020"
    _flip(newest / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors does not match its checksum"):
        read_checkpoint(newest)
    said = []
    result = train(tiny_config(tiny_cache, tmp_path, "killed", resume=True), say=said.append)
    assert any("skipped a damaged checkpoint" in s and "step-00000020/model.safetensors" in s for s in said)
    assert any("resuming" in s and "at step 10" in s for s in said)
    assert result.state.step == 40
    full = load_file(str(tmp_path / "full" / "sae" / "sae.safetensors"))
    resumed = load_file(str(tmp_path / "killed" / "sae" / "sae.safetensors"))
    for name in full:
        assert torch.equal(full[name], resumed[name]), name


def test_a_damaged_sae_is_refused_by_load_and_by_evaluate(tiny_cache, tmp_path, capsys):
    train(tiny_config(tiny_cache, tmp_path, steps=10))
    capsys.readouterr()
    weights = tmp_path / "run" / "sae" / "sae.safetensors"
    load_sae(weights.parent)  # intact: loads
    _flip(weights)
    with pytest.raises(ValueError, match=rf"{weights} does not match its checksum in .*sae.json"):
        load_sae(weights.parent)
    assert evaluate_main([str(tmp_path / "run"), "--no-downstream"]) == 2
    err = capsys.readouterr().err
    assert str(weights) in err and "checksum" in err and len(err.strip().splitlines()) == 1
