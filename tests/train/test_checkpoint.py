"""Checkpoints: atomic, pruned, pickle-free, exact; a full disk leaves the previous one intact."""

import errno
import json

import pytest
import torch
from safetensors.torch import load_file

import train.checkpoint as ckpt_mod
from tests.train.cache_fixtures import write_cache
from tests.train.run_fixtures import TINY, tiny_config
from train.checkpoint import Checkpoint, CheckpointError, latest_checkpoint, list_checkpoints, write_checkpoint
from train.run import train
from train.snapshot import optimizer_from_tensors, optimizer_to_tensors, rng_from_tensors, rng_to_tensors


def _ckpt(step: int, value: float) -> Checkpoint:
    tensors = {"model": {"w": torch.full((3, 2), value)}, "optimizer": {}, "state": {"n": torch.arange(4)}}
    return Checkpoint(step, tensors, {"note": f"step {step}"})


def _folder_bytes(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_roundtrip_and_only_the_last_two_are_kept(tmp_path):
    for step in (10, 20, 30):
        write_checkpoint(tmp_path, _ckpt(step, float(step)))
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step-00000020", "step-00000030"]
    got = latest_checkpoint(tmp_path)
    assert got.step == 30 and got.meta["note"] == "step 30"
    assert torch.equal(got.tensors["model"]["w"], torch.full((3, 2), 30.0))
    assert torch.equal(got.tensors["state"]["n"], torch.arange(4))
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_disk_full_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    write_checkpoint(tmp_path, _ckpt(10, 1.0))
    before = _folder_bytes(list_checkpoints(tmp_path)[-1])
    real = ckpt_mod._write_tensors
    calls = []

    def full_disk(path, tensors):
        calls.append(path)
        if len(calls) == 2:  # the second file of the new checkpoint
            path.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, tensors)

    monkeypatch.setattr(ckpt_mod, "_write_tensors", full_disk)
    with pytest.raises(CheckpointError, match="disk full.*step-00000020.*step-00000010.*intact"):
        write_checkpoint(tmp_path, _ckpt(20, 2.0))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000010"]
    assert _folder_bytes(list_checkpoints(tmp_path)[-1]) == before
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert latest_checkpoint(tmp_path).step == 10


def test_a_truncated_newest_checkpoint_is_skipped(tmp_path):
    write_checkpoint(tmp_path, _ckpt(10, 1.0))
    write_checkpoint(tmp_path, _ckpt(20, 2.0))
    newest = list_checkpoints(tmp_path)[-1] / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:-8])
    got = latest_checkpoint(tmp_path)
    assert got.step == 10
    assert any("truncated" in s for s in got.meta["skipped"])


def test_optimizer_and_rng_round_trip_exactly():
    torch.manual_seed(1)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    tensors, meta = optimizer_to_tensors(opt, model)
    meta = json.loads(json.dumps(meta))  # what the checkpoint's JSON holds
    twin = torch.nn.Linear(4, 3)
    twin.load_state_dict(model.state_dict())
    opt2 = torch.optim.Adam(twin.parameters(), lr=0.5)
    optimizer_from_tensors(opt2, twin, {k: v.clone() for k, v in tensors.items()}, meta)
    rng = rng_to_tensors()
    x = torch.randn(5, 4)
    rng_from_tensors(rng)
    assert torch.equal(torch.randn(5, 4), x)
    for m, o in ((model, opt), (twin, opt2)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_optimizer_state_from_another_model_is_refused():
    model, other = torch.nn.Linear(4, 3), torch.nn.Sequential(torch.nn.Linear(4, 3))
    opt, opt2 = torch.optim.Adam(model.parameters()), torch.optim.Adam(other.parameters())
    tensors, meta = optimizer_to_tensors(opt, model)
    with pytest.raises(ValueError, match="different SAE"):
        optimizer_from_tensors(opt2, other, tensors, meta)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("cache") / "c", content="sparse", **TINY).path


def test_run_checkpoints_hold_no_pickle(tiny_cache, tmp_path):
    train(tiny_config(tiny_cache, tmp_path, steps=20))
    ckpts = list_checkpoints(tmp_path / "run")
    assert ckpts
    for folder in ckpts:
        for f in folder.iterdir():
            # every file is safetensors or JSON; neither format can hold a pickle
            if f.suffix == ".safetensors":
                assert load_file(str(f))
            else:
                assert f.suffix == ".json"
                json.loads(f.read_text())
    for f in (tmp_path / "run").rglob("*"):
        assert f.suffix not in (".pt", ".pth", ".pkl", ".bin")


def test_disk_full_during_a_run_keeps_the_previous_checkpoint_and_resume_finishes(tiny_cache, tmp_path, monkeypatch):
    real = ckpt_mod._write_tensors
    saved = {}

    def full_on_step_20(path, tensors):
        if path.parent.name.endswith("step-00000020"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, tensors)

    def remember(state):
        if state.step == 10:
            saved.update(_folder_bytes(list_checkpoints(tmp_path / "run")[-1]))

    monkeypatch.setattr(ckpt_mod, "_write_tensors", full_on_step_20)
    with pytest.raises(CheckpointError, match="disk full"):
        train(tiny_config(tiny_cache, tmp_path), after_step=[remember])
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000010"]
    assert _folder_bytes(list_checkpoints(tmp_path / "run")[-1]) == saved
    monkeypatch.setattr(ckpt_mod, "_write_tensors", real)
    result = train(tiny_config(tiny_cache, tmp_path, resume=True))
    assert result.state.step == 40
