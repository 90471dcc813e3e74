"""SIGTERM, SIGINT, SIGUSR1 during training: the step finishes, a checkpoint of it is written, the
message says how to resume, the exit status is 128 + signum, and the resumed run ends bitwise equal to
an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.lock_holder import REPO
from tests.train.cache_fixtures import write_cache
from tests.train.run_fixtures import TINY, tiny_config
from train.checkpoint import list_checkpoints
from train.preempt import Preempted
from train.run import train


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("cache") / "c", content="sparse", **TINY).path


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_a_signal_checkpoints_the_step_and_the_resume_is_exact(tiny_cache, tmp_path, sig):
    # The suite may run as a background job, where the shell starts it with SIGINT ignored (and an
    # ignored signal stays ignored, by design): give the signal its usual handler for this test.
    usual = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
    before = signal.signal(sig, usual)
    try:
        _signal_checkpoints_the_step(tiny_cache, tmp_path, sig, usual)
    finally:
        signal.signal(sig, before)


def _signal_checkpoints_the_step(tiny_cache, tmp_path, sig, usual):
    train(tiny_config(tiny_cache, tmp_path, "full"))

    def signal_at_17(state):
        if state.step == 17:
            os.kill(os.getpid(), sig)  # delivered to the main thread before the next bytecode

    with pytest.raises(Preempted) as info:
        train(tiny_config(tiny_cache, tmp_path, "stopped"), after_step=[signal_at_17])
    assert info.value.signum == sig and info.value.step == 17
    message = str(info.value)
    assert message.startswith(f"stopped by {signal.Signals(sig).name} after step 17: checkpoint step-00000017")
    assert "--resume" in message
    assert [p.name for p in list_checkpoints(tmp_path / "stopped")][-1] == "step-00000017"
    assert signal.getsignal(sig) is usual  # the handler given back
    result = train(tiny_config(tiny_cache, tmp_path, "stopped", resume=True))
    assert result.state.step == 40
    full = load_file(str(tmp_path / "full" / "sae" / "sae.safetensors"))
    resumed = load_file(str(tmp_path / "stopped" / "sae" / "sae.safetensors"))
    for name in full:
        assert torch.equal(full[name], resumed[name]), name


def test_the_cli_exits_128_plus_signum_with_the_resume_line(tiny_cache, tmp_path):
    args = [sys.executable, "-m", "train", "--model", "vanilla", f"training.cache={tiny_cache}",
            f"training.output_dir={tmp_path}", "training.run_name=run", "training.steps=1000000",
            "training.batch_size=16", "training.log_every=5", "training.checkpoint_every=100000",
            "model.latent_size=64", "training.shuffle_buffer_rows=512"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    (line,) = [s for s in err.splitlines() if s.startswith("stopped by SIGTERM")]
    step = int(line.split("after step ")[1].split(":")[0])
    assert f"checkpoint step-{step:08d} written" in line and "--resume" in line
    state = json.loads((list_checkpoints(tmp_path / "run")[-1] / "state.json").read_text())
    assert state["step"] == step >= 10


def test_a_signal_ignored_at_start_stays_ignored(tiny_cache, tmp_path):
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell starts a background job
    try:
        def interrupt_at_5(state):
            if state.step == 5:
                os.kill(os.getpid(), signal.SIGINT)

        result = train(tiny_config(tiny_cache, tmp_path, "bg"), after_step=[interrupt_at_5])
        assert result.state.step == 40  # ran to its end
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
