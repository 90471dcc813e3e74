"""durable.launcher: a worker whose launcher is killed (kill -9) is sent SIGTERM within a poll, and one that
does not stop on it is ended after the grace period; outside torchrun nothing is watched."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from durable import launcher
from tests.launcher_kill import running

REPO = Path(__file__).resolve().parents[2]

# The launcher: starts the worker and sleeps, printing the worker's pid.
PARENT = """
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", sys.argv[1], *sys.argv[2:]])
print(worker.pid, flush=True)
time.sleep(600)
"""
# The worker: watches its launcher; on SIGTERM it notes the signal and exits, or (argv[2] == "stay") keeps
# running as a process stuck in a collective would.
WORKER = """
import os, signal, sys, time
from pathlib import Path
from durable import launcher
marks = Path(sys.argv[1])
def on_term(signum, frame):
    (marks / "sigterm").write_text(str(time.monotonic()))
    if sys.argv[2] != "stay":
        sys.exit(143)
signal.signal(signal.SIGTERM, on_term)
launcher.watch_launcher(poll=0.05, grace=1.0, force=True)
(marks / "ready").write_text("")
while True:
    time.sleep(0.01)
"""


def _start(tmp_path: Path, mode: str) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, WORKER, str(tmp_path), mode], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    worker = int(parent.stdout.readline()) if parent.stdout else 0
    deadline = time.monotonic() + 60
    while not (tmp_path / "ready").exists():
        assert time.monotonic() < deadline and parent.poll() is None, parent.communicate()
        time.sleep(0.02)
    return parent, worker


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not running(pid)


@pytest.mark.parametrize("mode", ["stops", "stay"])
def test_a_worker_whose_launcher_is_killed_gets_sigterm_and_stops(tmp_path, mode):
    parent, worker = _start(tmp_path, mode)
    try:
        time.sleep(0.3)
        assert not (tmp_path / "sigterm").exists()  # the launcher is alive: nothing happens
        os.kill(parent.pid, signal.SIGKILL)  # the launcher only (here the worker shares its group)
    except BaseException:
        os.kill(worker, signal.SIGKILL)
        raise
    parent.wait()
    try:
        # SIGTERM within a few polls; a worker that ignores it is ended after the grace period (1 s here)
        assert _gone_within(worker, 10.0)
        assert (tmp_path / "sigterm").exists()
    finally:
        if running(worker):
            os.kill(worker, signal.SIGKILL)


def test_outside_torchrun_nothing_is_watched(monkeypatch):
    monkeypatch.delenv(launcher.TORCHRUN_ENV, raising=False)
    assert launcher.watch_launcher() is None


def test_one_watch_per_process(monkeypatch):
    monkeypatch.setenv(launcher.TORCHRUN_ENV, "test")
    first = launcher.watch_launcher(poll=0.05)
    try:
        assert first is not None and launcher.watch_launcher() is first and first.parent == os.getppid()
    finally:
        assert first is not None
        first.close()
    assert launcher._watch is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_worker_started_after_its_launcher_died_stops_before_joining(monkeypatch):
    """The launcher's rendezvous store refuses connections: the worker stops instead of waiting for it."""
    monkeypatch.setenv(launcher.TORCHRUN_ENV, "test")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))  # nothing listens there
    try:
        with pytest.raises(launcher.LauncherGone, match=r"the launcher is gone \(its rendezvous store at 127.0.0.1:"):
            launcher.watch_launcher(poll=0.05)
    finally:
        if launcher._watch is not None:
            launcher._watch.close()
    with socket.create_server(("127.0.0.1", 0)) as server:  # the store listens: the worker goes on
        monkeypatch.setenv("MASTER_PORT", str(server.getsockname()[1]))
        watch = launcher.watch_launcher(poll=0.05)
        assert watch is not None
        watch.close()


EXIT = """
import atexit, sys, threading, time
from pathlib import Path
from durable.launcher import exit_process
atexit.register(lambda: Path(sys.argv[1]).write_text("atexit ran"))
# a non-daemon thread that would hold an ordinary exit until it ends: os._exit does not wait for it
threading.Thread(target=time.sleep, args=(60,)).start()
sys.stdout.write("unflushed output")
exit_process(3)
"""


@pytest.mark.parametrize("torchrun", [True, False])
def test_exit_process_keeps_the_status_the_atexit_handlers_and_the_output(tmp_path, torchrun):
    env = {k: v for k, v in os.environ.items() if k != launcher.TORCHRUN_ENV}
    env["PYTHONPATH"] = str(REPO)
    if torchrun:
        env[launcher.TORCHRUN_ENV] = "test"
    script = EXIT if torchrun else EXIT.replace("threading.Thread(target=time.sleep, args=(60,)).start()", "")
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "flag")], env=env, capture_output=True,
                          text=True, timeout=50)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "unflushed output"
    assert (tmp_path / "flag").read_text() == "atexit ran"
    assert time.monotonic() - t0 < 30  # under torchrun, no interpreter teardown: the thread is not joined
