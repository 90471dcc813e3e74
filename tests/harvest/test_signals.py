"""SIGTERM or SIGUSR1 during a harvest: every complete shard is committed, the message says how to
resume, the status is 128 + signum, and the rerun ends with the shards of an uninterrupted harvest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import tests.harvest.test_run as test_run
from harvest.run import harvest
from tests.lock_holder import REPO

corpus, models = test_run.corpus, test_run.models
_args, _cfg, _error_lines = test_run._args, test_run._cfg, test_run._error_lines

# The harvest CLI with each window slowed down, so that the signal lands mid-harvest.
_SLOW = """
import sys, time
import harvest.run as run
real = run.compute_window
run.compute_window = lambda *a, **k: (time.sleep(0.1), real(*a, **k))[1]
from harvest.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def _shards(out):
    m = json.loads((out / "manifest.json").read_text())
    return [(e["name"], e["xxh3"]) for s in ("train", "heldout") for e in m["shards"][s]]


@pytest.mark.parametrize("sig, backend", [(signal.SIGTERM, "safetensors"), (signal.SIGUSR1, "safetensors"),
                                          (signal.SIGTERM, "zarr")])
def test_a_signal_commits_complete_shards_and_the_rerun_finishes_the_same(models, corpus, tmp_path, sig, backend):
    extra = ("harvest.max_tokens=2000", "harvest.shard_rows=50", "harvest.shuffle_window=2",
             f"harvest.backend={backend}")
    args = _args(models("gpt2"), corpus, tmp_path / "c", *extra)
    harvest(_cfg(models("gpt2"), corpus, tmp_path / "ref", *extra), progress=False)  # uninterrupted
    proc = subprocess.Popen([sys.executable, "-c", _SLOW, "--quiet", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests' / 'harvest'}"})
    out = tmp_path / "c"
    deadline = time.monotonic() + 120
    while not ((out / "manifest.json").is_file() and len(_shards(out)) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    (line,) = _error_lines(err)
    assert f"stopped by {signal.Signals(sig).name}" in line and "rerun the same command to resume" in line
    committed = _shards(out)
    assert committed and not json.loads((out / "manifest.json").read_text())["complete"]
    harvest(_cfg(models("gpt2"), corpus, out, *extra), progress=False)
    final = _shards(out)
    assert set(committed) <= set(final)  # committed shards are never rewritten
    assert final == _shards(tmp_path / "ref")
