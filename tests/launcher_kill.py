"""Start torchrun in a process group of its own, as `make ... NPROC=2` in a shell is, learn its workers,
kill -9 the group, and see which workers are still running: for the multi-process stop tests of every
stage (Linux: the workers are found through /proc)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "--max-restarts", "0"]


def launch(target: list[str], log: Path) -> subprocess.Popen:
    """torchrun over `target` (["-m", "train", ...] or [script, ...]) in a new session (its own group),
    stdout and stderr into `log`."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(key, None)
    with log.open("w") as out:
        return subprocess.Popen([*TORCHRUN, *target], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie, dead and not yet reaped, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def workers_started(pid: int, n_workers: int = 2) -> bool:
    """Whether the launcher `pid` has its `n_workers` workers, each in the session of its own that torchrun
    gives it (until a worker's setsid, a kill of the launcher's group would take it too)."""
    workers = children(pid)
    try:
        return len(workers) == n_workers and all(os.getsid(w) == w for w in workers)
    except OSError:
        return False


def kill_group_when(launcher: subprocess.Popen, ready: Callable[[], bool], log: Path, n_workers: int = 2,
                    timeout: float = 300) -> list[int]:
    """Wait until `ready()` (the job is under way), then kill -9 the launcher's process group; returns
    the worker pids (the launcher's children just before the kill)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if launcher.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the job ended or stalled before it was killed:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)
    workers = children(launcher.pid)
    assert len(workers) == n_workers, (workers, log.read_text()[-3000:])
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()
    return workers


def survivors(workers: list[int], within: float) -> list[int]:
    """The workers still running `within` seconds from now (returns as soon as none is)."""
    deadline = time.monotonic() + within
    while any(running(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [w for w in workers if running(w)]
    for w in left:  # do not leave them to finish the job behind the next test's back
        os.kill(w, signal.SIGKILL)
    return left
