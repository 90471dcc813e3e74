"""A multi-process training stops as a whole (issue 17): kill -9 the launcher's process group (torchrun
starts each worker in a session of its own, so the kill reaches only torchrun) and no worker finishes
the run alone: within seconds both ranks stop at one step, rank 0 checkpoints it, the folder locks are
free, and `--resume` ends bitwise equal to an uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from durable import lock
from tests.launcher_kill import kill_group_when, launch, survivors, workers_started
from tests.train.test_ddp import overrides
from train.checkpoint import list_checkpoints, read_checkpoint

pytestmark = pytest.mark.slow

STEPS = 400


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory) -> Path:
    from tests.train.cache_fixtures import write_cache

    path = tmp_path_factory.mktemp("ddp-stop") / "cache"
    write_cache(path, content="sparse", n_train=2000, n_heldout=256, layers=(0, 1, 2), d_model=16, shard_rows=500,
                noise=0.05)
    return path


def _train(cache: Path, out: Path, name: str, *extra: str) -> list[str]:
    over = overrides(cache, out, name, "VanillaSAE", **{"training.steps": STEPS, "training.checkpoint_every": 1000,
                                                        "training.log_every": 5})
    return ["-m", "train", "--model", "vanilla", *over, *extra]


def test_kill_9_of_the_launcher_group_stops_every_worker_and_resume_is_bitwise(cache_path, tmp_path):
    full = launch(_train(cache_path, tmp_path, "full"), tmp_path / "full.log")
    assert full.wait(timeout=600) == 0, (tmp_path / "full.log").read_text()[-3000:]

    log = tmp_path / "job.log"
    job = launch(_train(cache_path, tmp_path, "job"), log)
    metrics = tmp_path / "job" / "metrics.jsonl"
    workers = kill_group_when(job, lambda: metrics.is_file() and metrics.read_text().count("\n") >= 2, log)
    assert survivors(workers, within=15) == [], log.read_text()[-3000:]

    text = log.read_text()
    assert "the launcher (pid" in text and "is gone: stopping this process" in text, text[-3000:]
    assert "done:" not in text and not (tmp_path / "job" / "sae").exists()  # nobody finished the run alone
    state = read_checkpoint(list_checkpoints(tmp_path / "job")[-1])
    assert 10 <= state.step < STEPS and state.meta["world_size"] == 2
    assert f"stopped by SIGTERM after step {state.step}: checkpoint step-{state.step:08d} written" in text
    assert lock.holders(tmp_path / "job") == [] and lock.holders(cache_path) == []  # the locks are free

    resumed = launch(_train(cache_path, tmp_path, "job", "training.resume=true"), tmp_path / "resumed.log")
    assert resumed.wait(timeout=600) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    assert f"resuming {tmp_path / 'job'} at step {state.step}" in (tmp_path / "resumed.log").read_text()
    a = load_file(str(tmp_path / "full" / "sae" / "sae.safetensors"))
    b = load_file(str(tmp_path / "job" / "sae" / "sae.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].equal(b[name]), name  # bitwise, as if never killed


def test_a_launcher_killed_before_its_workers_joined_leaves_no_worker_waiting(cache_path, tmp_path):
    """Killed while its workers still import: they are no longer its children when they start watching,
    and find its rendezvous store gone instead of waiting for it (30 minutes) or training alone."""
    log = tmp_path / "early.log"
    job = launch(_train(cache_path, tmp_path, "early"), log)
    workers = kill_group_when(job, lambda: workers_started(job.pid), log)
    assert survivors(workers, within=120) == [], log.read_text()[-3000:]
    text = log.read_text()
    assert text.count("the launcher is gone (its rendezvous store at") == 2, text[-3000:]
    assert not (tmp_path / "early" / "checkpoints").exists()  # nothing was trained
    assert lock.holders(cache_path) == []
