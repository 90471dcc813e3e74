"""kill -9 inside a checkpoint write (a real SIGKILL, in a child process): the resume ignores the
half-written temporary, continues from the last complete checkpoint, and ends bitwise equal to an
uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.lock_holder import REPO
from tests.train.cache_fixtures import write_cache
from tests.train.run_fixtures import TINY, tiny_config
from train.checkpoint import list_checkpoints
from train.run import train

# Train in a child that SIGKILLs itself at a chosen point of the step-20 checkpoint.
_CHILD = """
import json, os, signal, sys
import train.checkpoint as ck
from tests.train.run_fixtures import tiny_config
from train.run import train
where, cache, out = sys.argv[1], sys.argv[2], sys.argv[3]
real_tensors, real_replace = ck._write_tensors, ck.os.replace
def tensors(path, t):
    if where == "tensors" and "step-00000020" in str(path) and path.name == "optimizer.safetensors":
        real_tensors(path, t)
        os.kill(os.getpid(), signal.SIGKILL)  # model and optimizer written, state not yet
    real_tensors(path, t)
class _Os:
    def __getattr__(self, name):
        return getattr(os, name)
    @staticmethod
    def replace(a, b):
        real_replace(a, b)
        if where == "rename" and str(b).endswith("step-00000020"):
            os.kill(os.getpid(), signal.SIGKILL)  # renamed, the folder not yet fsynced
ck._write_tensors = tensors
ck.os = _Os()
train(tiny_config(cache, out, "killed"))
"""


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("cache") / "c", content="sparse", **TINY).path


@pytest.mark.parametrize("where, resumes_at", [("tensors", 10), ("rename", 20)])
def test_kill_9_inside_a_checkpoint_write_resumes_exactly(tiny_cache, tmp_path, where, resumes_at):
    train(tiny_config(tiny_cache, tmp_path, "full"))
    child = subprocess.run([sys.executable, "-c", _CHILD, where, str(tiny_cache), str(tmp_path)], cwd=REPO,
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    leftovers = [p.name for p in (tmp_path / "killed" / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert leftovers == ([".tmp-step-00000020"] if where == "tensors" else [])
    said = []
    result = train(tiny_config(tiny_cache, tmp_path, "killed", resume=True), say=said.append)
    assert any(f"at step {resumes_at}" in s for s in said), said
    assert result.state.step == 40
    assert not [p for p in (tmp_path / "killed" / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    full = load_file(str(tmp_path / "full" / "sae" / "sae.safetensors"))
    resumed = load_file(str(tmp_path / "killed" / "sae" / "sae.safetensors"))
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    assert json.loads((list_checkpoints(tmp_path / "killed")[-1] / "state.json").read_text())["step"] == 40
