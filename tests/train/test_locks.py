"""Training holds its run folder (exclusive) and its cache (shared): a second training on the folder,
a writer on the cache, and a cache changed under the run are each refused or stopped in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from durable import lock
from tests.lock_holder import REPO, holder, kill, start_holder
from tests.train.cache_fixtures import write_cache
from tests.train.run_fixtures import TINY, tiny_config
from train.run import TrainError, train
from train.rundir import RunDirError


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("cache") / "c", content="sparse", **TINY).path


def _bytes(folder):
    """Every file's bytes."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_second_training_on_a_run_folder_is_refused_even_with_overwrite(tiny_cache, tmp_path):
    train(tiny_config(tiny_cache, tmp_path, steps=10))
    before = _bytes(tmp_path / "run")
    with holder(tmp_path / "run") as other:  # as a training in progress holds it
        for extra in ({}, {"overwrite": True}, {"resume": True}):
            with pytest.raises(RunDirError) as info:
                train(tiny_config(tiny_cache, tmp_path, steps=20, **extra))
            message = str(info.value)
            assert f"run folder {tmp_path / 'run'} is in use by pid {other.pid} on " in message
            assert "\n" not in message
        assert _bytes(tmp_path / "run") == before  # nothing read, deleted or written


def test_a_run_folder_left_locked_by_a_killed_training_is_taken_over(tiny_cache, tmp_path):
    kill(start_holder(tmp_path / "run"))
    said = []
    result = train(tiny_config(tiny_cache, tmp_path, steps=10), say=said.append)
    assert result.state.step == 10
    assert any("took over the lock on run folder" in s and "no longer runs" in s for s in said)


def test_training_refuses_a_cache_being_written(tiny_cache, tmp_path):
    with holder(tiny_cache) as writer:
        with pytest.raises(TrainError, match=rf"cannot train on training.cache=.*is being written by pid {writer.pid}"):
            train(tiny_config(tiny_cache, tmp_path, steps=10))
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


_OVERWRITE = """
import sys
import cache
try:
    cache.CacheWriter(sys.argv[1], layers=[0], d_model=8, dtype="float32", shard_rows=10, identity={},
                      metadata={}, overwrite=True)
except RuntimeError as e:
    print(e)
    sys.exit(3)
"""


def test_a_cache_being_read_by_a_training_cannot_be_overwritten(tiny_cache, tmp_path):
    before = _bytes(tiny_cache)
    seen = []

    def try_to_overwrite(state):
        if state.step == 3:
            seen.append(subprocess.run([sys.executable, "-c", _OVERWRITE, str(tiny_cache)], cwd=REPO, text=True,
                                       capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)}))

    result = train(tiny_config(tiny_cache, tmp_path, steps=10), after_step=[try_to_overwrite])
    assert result.state.step == 10
    assert seen[0].returncode == 3, seen[0].stderr
    assert f"cache {tiny_cache} is being read by pid {os.getpid()}" in seen[0].stdout
    assert _bytes(tiny_cache) == before


@pytest.mark.parametrize("backend", ["safetensors", "zarr"])
def test_a_cache_changed_under_a_training_stops_it_in_one_line(tmp_path, backend):
    path = write_cache(tmp_path / "c", content="sparse", backend=backend, **TINY).path

    def rewrite_behind_the_lock(state):  # as a writer on another host without shared locks would
        if state.step == 3:
            m = json.loads((path / "manifest.json").read_text())
            m["metadata"]["rewritten"] = True
            (path / "manifest.json").write_text(json.dumps(m))

    with pytest.raises(TrainError) as info:
        train(tiny_config(path, tmp_path / "runs", steps=20), after_step=[rewrite_behind_the_lock])
    message = str(info.value)
    assert f"the cache {path} changed while this run read it" in message and "at step 10" in message
    assert "\n" not in message


def test_the_locks_are_released_when_the_run_ends(tiny_cache, tmp_path):
    with pytest.raises(TrainError):
        train(tiny_config(tiny_cache, tmp_path, steps=10, **{"model.layer": 99}))
    train(tiny_config(tiny_cache, tmp_path, steps=10))
    with lock.exclusive(tmp_path / "run"), lock.exclusive(tiny_cache):
        pass  # free in this process's registry too
    kill(start_holder(tmp_path / "run"))  # and free for other processes
