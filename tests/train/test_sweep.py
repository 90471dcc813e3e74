"""Sweeps: the file format and its errors, one pass that equals solo runs bitwise, resume after a kill,
a member that diverges alone, and the CLI."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from settings import load_config
from tests.train.cache_fixtures import write_cache
from tests.train.run_fixtures import TINY
from train.checkpoint import list_checkpoints, read_checkpoint
from train.run import train
from train.sweep import onepass
from train.sweep.__main__ import main as sweep_main
from train.sweep.run import SUMMARY_FILE, run_sweep
from train.sweep.spec import SweepError, load_sweep


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def sparse_cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("cache") / "c", content="sparse", **TINY).path


@pytest.fixture()
def base(tmp_path, sparse_cache):
    path = tmp_path / "base.yaml"
    path.write_text(
        f"training:\n  cache: {sparse_cache}\n  batch_size: 128\n  steps: 40\n  log_every: 5\n"
        f"  checkpoint_every: 10\n  output_dir: {tmp_path / 'runs'}\n  shuffle_buffer_rows: 512\n  lr: 1.0e-3\n"
    )
    return path


SMALL = "model.latent_size: 64, model.k: 4, model.aux_k: null, model.layer: 1"


def _sweep_file(tmp_path, base, body, name="s"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"base:\n  preset: topk\n  config: {base}\n  overrides: {{{SMALL}}}\n{body}")
    return path


MIXED = """members:
  - {name: topk, model.k: 4}
  - {name: topk8, model.k: 8, training.lr: 2.0e-3}
  - {name: gated, model.type: gated, model.layer: 2}
"""


# ---- the file format ------------------------------------------------------------------------------
def test_grid_times_list_expands_into_named_members_with_their_configs(tmp_path, base):
    path = _sweep_file(tmp_path, base, "grid:\n  model.k: [4, 8]\n  training.lr: [1.0e-3, 2.0e-3]\n"
                                       "members:\n  - {name: a}\n  - {name: g, model.type: gated}\n")
    sweep = load_sweep(path)
    names = [m.name for m in sweep.members]
    assert names == ["a-k4-lr0.001", "a-k4-lr0.002", "a-k8-lr0.001", "a-k8-lr0.002",
                     "g-k4-lr0.001", "g-k4-lr0.002", "g-k8-lr0.001", "g-k8-lr0.002"]
    by = {m.name: m.config for m in sweep.members}
    assert by["a-k8-lr0.002"].model.k == 8 and by["a-k8-lr0.002"].training.lr == 2e-3
    assert by["a-k4-lr0.001"].model.type == "topk" and by["g-k4-lr0.001"].model.type == "gated"
    # The gated member starts from the gated preset (its l1 coefficient), then the base overrides.
    gated_preset = load_config([Path("configs/sae/gated.yaml")])
    assert by["g-k4-lr0.001"].training.l1_coefficient == gated_preset.training.l1_coefficient != 0
    assert by["g-k4-lr0.001"].model.latent_size == 64
    assert sweep.output_dir == tmp_path / "runs" / "s"
    assert {c.training.output_dir for c in by.values()} == {str(tmp_path / "runs" / "s")}
    assert by["a-k4-lr0.001"].training.run_name == "a-k4-lr0.001"
    assert sweep.varied_keys == ["model.k", "model.type", "training.lr"]


def test_command_line_overrides_apply_to_every_member(tmp_path, base):
    sweep = load_sweep(_sweep_file(tmp_path, base, "grid:\n  model.k: [4, 8]\n"), ["training.steps=7"],
                       overwrite=True)
    assert [m.config.training.steps for m in sweep.members] == [7, 7]
    assert all(m.config.training.overwrite for m in sweep.members)


@pytest.mark.parametrize(("body", "cli", "message"), [
    ("grid:\n  model.k: [4]\nextra: 1\n", [], r"unknown sweep key 'extra'"),
    ("grid:\n  model.k: 4\n", [], r"grid\.model\.k must be a non-empty list"),
    ("grid:\n  k: [4]\n", [], r"grid key 'k' must be section\.key"),
    ("members:\n  - {name: a, model.kk: 4}\n", [], r"member a: unknown config key model\.kk; did you mean model\.k"),
    ("members:\n  - {name: a, training.lr: fast}\n", [], r"member a: config key training\.lr must be float"),
    ("members:\n  - {name: a}\n  - {name: b, training.batch_size: 256}\n", [],
     r"training\.batch_size differs between members \(a: 128, b: 256\)"),
    ("members:\n  - {name: a}\n  - {name: a, model.k: 8}\n", [], r"member names \['a'\] occur more than once"),
    ("grid:\n  model.k: [4, 8]\n", ["model.k=16"], r"the command line sets model\.k, which the sweep varies"),
    ("members:\n  - {name: a, training.run_name: x}\n", [], r"set by the sweep"),
    ("name: a/b\ngrid:\n  model.k: [4]\n", [], r"name='a/b' must be a plain folder name"),
    ("base: {}\n", [], r"needs `grid:`"),
])
def test_a_bad_sweep_file_is_refused_naming_the_key(tmp_path, base, body, cli, message):
    with pytest.raises(SweepError, match=message):
        load_sweep(_sweep_file(tmp_path, base, body), cli)


# ---- one pass ------------------------------------------------------------------------------------
def _weights(run_dir):
    return load_file(str(Path(run_dir) / "sae" / "sae.safetensors"))


def _solo(member_dir, out, name):
    """`make train` with the member's saved config.yaml (its resolved config), in another folder."""
    cfg = load_config([Path(member_dir) / "config.yaml"], [f"training.output_dir={out}", f"training.run_name={name}"])
    return train(cfg).run_dir


def _assert_same_run(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    ca, cb = read_checkpoint(list_checkpoints(a)[-1]), read_checkpoint(list_checkpoints(b)[-1])
    for group in ("model", "optimizer", "state"):
        assert ca.tensors[group].keys() == cb.tensors[group].keys()
        for name in ca.tensors[group]:
            assert torch.equal(ca.tensors[group][name], cb.tensors[group][name]), (group, name)


def test_each_member_ends_bitwise_equal_to_its_solo_run_and_batches_are_read_once(tmp_path, base):
    body = MIXED + "  - {name: route, model.type: route, model.start_layer: 0, model.end_layer: 3}\n"
    sweep = load_sweep(_sweep_file(tmp_path, base, body))
    result = run_sweep(sweep)
    assert [o.status for o in result.outcomes] == ["done"] * 4
    assert result.batches_read == 40  # 40 steps of every member from 40 batches
    for m in sweep.members:
        member_dir = sweep.output_dir / m.name
        _assert_same_run(member_dir, _solo(member_dir, tmp_path / "solo", m.name))
    gated = json.loads((sweep.output_dir / "gated" / "sae" / "sae.json").read_text())
    assert gated["meta"]["layers"] == [2] and gated["config"]["type"] == "GatedSAE"
    summary = json.loads((sweep.output_dir / SUMMARY_FILE).read_text())
    assert [r["member"] for r in summary["members"]] == ["topk", "topk8", "gated", "route"]
    assert summary["stopped"] == [] and summary["batches_read"] == 40
    # The reader read layers 0..2 once: 3 layers' worth of a solo one-layer run's bytes.
    solo = json.loads((tmp_path / "solo" / "topk" / "train_summary.json").read_text())["cache_bytes_read"]
    assert summary["cache_bytes_read"] <= 3 * solo


@pytest.mark.parametrize("how", ["a member raises", "Ctrl-C while the reader waits"])
def test_resume_after_a_kill_resumes_every_member_bitwise(tmp_path, base, how, sigint_raises):
    full = load_sweep(_sweep_file(tmp_path, base, MIXED, name="full"))
    run_sweep(full)
    stop = Killed if how == "a member raises" else KeyboardInterrupt

    def kill(member, state):
        if member == "topk8" and state.step == 25:  # after every member's checkpoint at step 20
            if stop is Killed:
                raise Killed
            # SIGINT reaches the main thread (the reader, waiting for this member's turn to end); the
            # member finishes its step, and the sweep stops every member where it next waits.
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    killed = _sweep_file(tmp_path, base, MIXED, name="killed")
    with pytest.raises(stop):
        run_sweep(load_sweep(killed), after_step=kill)
    out = tmp_path / "runs" / "killed"
    for m in ("topk", "topk8", "gated"):
        assert list_checkpoints(out / m)[-1].name == "step-00000020", m
        assert not (out / m / "sae").exists()
    result = run_sweep(load_sweep(killed, resume=True))
    assert [o.status for o in result.outcomes] == ["done"] * 3
    assert result.batches_read == 20  # from batch 20 on: nothing read twice for the resumed members
    for m in full.members:
        _assert_same_run(full.output_dir / m.name, out / m.name)


def test_a_member_whose_loss_goes_non_finite_stops_alone(tmp_path, base, monkeypatch, capsys):
    rows_for = onepass.OnePass._rows_for

    def poisoned(self, member, x):
        rows = rows_for(self, member, x)
        if member.name == "topk8" and member.want == (1, 7):  # global batch 23: 16 batches an epoch
            rows[0, 0] = float("nan")
        return rows

    monkeypatch.setattr(onepass.OnePass, "_rows_for", poisoned)
    path = _sweep_file(tmp_path, base, MIXED)
    assert sweep_main([str(path)]) == 1
    err = capsys.readouterr().err
    out = tmp_path / "runs" / "s"
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert [(s["member"], s["status"]) for s in summary["stopped"]] == [("topk8", "stopped")]
    assert "step 23" in summary["stopped"][0]["reason"] and "step-00000020" in summary["stopped"][0]["reason"]
    assert "topk8: stopped: loss is NaN or infinite at step 23" in err
    assert list_checkpoints(out / "topk8")[-1].name == "step-00000020" and not (out / "topk8" / "sae").exists()
    for m in ("topk", "gated"):  # the others went on to the end, as if topk8 had not been there
        assert (out / m / "sae" / "sae.safetensors").is_file()
    monkeypatch.setattr(onepass.OnePass, "_rows_for", rows_for)
    _assert_same_run(out / "gated", _solo(out / "gated", tmp_path / "solo", "gated"))


# ---- memory ----------------------------------------------------------------------------------------
def test_a_sweep_that_would_not_fit_is_refused_before_it_starts_with_the_estimate(tmp_path, base, monkeypatch,
                                                                                   capsys):
    from train.sweep import memory

    sweep = load_sweep(_sweep_file(tmp_path, base, MIXED))
    data_d, batch, buffer_rows = 16, 128, 512
    # By hand: TopK/Gated parameters; 4 copies (weights, gradients, Adam's two moments) in float32, plus
    # each member's [B, d] batch; one step's 3 [B, d_sae]; the reader's 2 buffers and 2 batches of 2 layers.
    topk = 2 * data_d * 64 + 64 + data_d
    gated = topk + 2 * 64  # b_gate, r_mag and b_mag beside b_enc's place
    members = 4 * 4 * (2 * topk + gated) + 3 * 4 * batch * data_d
    step = 3 * 4 * batch * 64
    reader = (2 * buffer_rows * 4 + 2 * batch * 4) * 2 * data_d
    from train.sweep.run import check_memory, plan_layers

    data, choices = plan_layers(sweep)
    est = check_memory(sweep, data, choices, torch.device("cpu"))
    assert (est.members, est.step, est.reader) == (members, step, reader)
    monkeypatch.setattr(memory, "available_bytes", lambda device: est.total - 1)
    with pytest.raises(SweepError, match=r"would not fit on cpu: estimated .* GiB .* free on the device"):
        run_sweep(sweep)
    assert not (tmp_path / "runs").exists()  # refused before any run folder
    assert sweep_main([str(_sweep_file(tmp_path, base, MIXED))]) == 1
    assert "would not fit" in capsys.readouterr().err


def test_members_of_one_layer_share_the_loaders_one_layer_form_and_equal_their_solo_runs(tmp_path, base):
    sweep = load_sweep(_sweep_file(tmp_path, base, "grid:\n  model.k: [4, 8]\n"))
    result = run_sweep(sweep)
    assert [o.status for o in result.outcomes] == ["done", "done"] and result.batches_read == 40
    for m in sweep.members:
        member_dir = sweep.output_dir / m.name
        _assert_same_run(member_dir, _solo(member_dir, tmp_path / "solo", m.name))
