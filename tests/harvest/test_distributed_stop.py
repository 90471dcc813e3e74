"""A multi-process harvest stops as a whole (issue 17): kill -9 the launcher's process group (torchrun
starts each worker in a session of its own) and no rank goes on harvesting and merging alone: within
seconds every rank commits its complete shards and stops, no merged cache appears, the folder locks are
free, and a rerun resumes to the rows of an uninterrupted harvest."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from durable import lock
from tests.harvest.test_distributed import REPO, TORCHRUN, _assert_same_cache, setup  # noqa: F401 - the fixture
from tests.launcher_kill import kill_group_when, launch, survivors

pytestmark = pytest.mark.slow

# Run under torchrun as a script: every window takes a while longer, as on a real model, so that the job
# is still under way when its launcher is killed.
SLOW = """
import sys, time
sys.path.insert(0, {repo!r})
import harvest.capture as capture
from harvest.__main__ import main
original = capture.WindowSink.submit
def submit(self, plan, acts, offset):
    time.sleep(0.4)
    return original(self, plan, acts, offset)
capture.WindowSink.submit = submit
sys.exit(main())
"""


def _committed_shards(rank_dir: Path) -> int:
    try:
        manifest = json.loads((rank_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return 0
    return sum(len(shards) for shards in manifest.get("shards", {}).values())


def test_kill_9_of_the_launcher_group_stops_every_rank_and_the_rerun_resumes(setup, tmp_path):  # noqa: F811
    out = tmp_path / "killed"
    script = tmp_path / "slow.py"
    script.write_text(SLOW.format(repo=str(REPO)))
    args = setup.args(out, "harvest.shard_rows=20")  # the set of rows does not depend on the shard size
    log = tmp_path / "job.log"
    job = launch([str(script), "--quiet", *args], log)
    workers = kill_group_when(job, lambda: _committed_shards(out / "rank-0") > 0, log)
    assert survivors(workers, within=15) == [], log.read_text()[-3000:]

    text = log.read_text()
    assert "the launcher (pid" in text and "is gone: stopping this process" in text, text[-3000:]
    assert "stopped by SIGTERM; every complete shard is committed" in text, text[-3000:]
    assert not (out / "manifest.json").exists()  # no rank merged alone
    assert lock.holders(out) == [] and lock.holders(out / "rank-0") == []

    proc = subprocess.run([*TORCHRUN, "-m", "harvest", "--quiet", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed by 2 processes" in proc.stdout
    _assert_same_cache(out, setup.one)
