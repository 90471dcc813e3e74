"""Under torchrun (2 CPU processes, gloo): one lock holder per job for the run folder and the cache, a
second training on the folder refused, and SIGTERM stops both ranks at the same step with a checkpoint
from which the resumed job ends equal to an uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from durable import lock
from tests.train.test_ddp import ROOT, overrides, weights
from train.checkpoint import list_checkpoints, read_checkpoint
from train.rundir import RunDirError

pytestmark = pytest.mark.slow

STEPS = 300


def _launch(over: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "0", "-m", "train", "--model", "vanilla", *over]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory) -> Path:
    from tests.train.cache_fixtures import write_cache

    path = tmp_path_factory.mktemp("ddp") / "cache"
    write_cache(path, content="sparse", n_train=2000, n_heldout=256, layers=(0, 1, 2), d_model=16, shard_rows=500,
                noise=0.05)
    return path


def test_one_holder_per_job_and_sigterm_stops_every_rank_at_one_checkpoint(cache_path, tmp_path):
    over = overrides(cache_path, tmp_path, "job", "VanillaSAE", **{"training.steps": STEPS,
                                                                     "training.checkpoint_every": 1000,
                                                                     "training.log_every": 5})
    full = _launch(overrides(cache_path, tmp_path, "full", "VanillaSAE", **{"training.steps": STEPS,
                                                                              "training.checkpoint_every": 1000,
                                                                              "training.log_every": 5}))
    assert full.wait(timeout=600) == 0, full.stderr.read() if full.stderr else ""
    job = _launch(over)
    metrics = tmp_path / "job" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1]
        time.sleep(0.1)
    # one holder per job: rank 0 holds the run folder and reads the cache; rank 1 holds nothing
    (run_holder,) = lock.holders(tmp_path / "job")
    (cache_reader,) = lock.holders(cache_path)
    assert run_holder["pid"] == cache_reader["pid"] and run_holder["mode"] == "exclusive"
    from tests.train.run_fixtures import tiny_config
    from train.run import train

    with pytest.raises(RunDirError, match=rf"run folder {tmp_path / 'job'} is in use by pid {run_holder['pid']}"):
        train(tiny_config(cache_path, tmp_path, "job", overwrite=True))
    job.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
    _, err = job.communicate(timeout=300)
    stopped = [line for line in err.splitlines() if "stopped by SIGTERM after step" in line]
    assert stopped, err
    step = list_checkpoints(tmp_path / "job")[-1]
    state = read_checkpoint(step)
    assert 0 < state.step < STEPS and state.meta["world_size"] == 2
    assert f"after step {state.step}:" in stopped[0]
    resumed = _launch(over + ["training.resume=true"])
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read() if resumed.stderr else ""
    a, b = weights(tmp_path / "full"), weights(tmp_path / "job")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-12), name
