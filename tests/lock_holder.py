"""Another process holding a folder's lock (durable.lock), for the tests of every package that locks."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_HOLD = ("import sys, time\nfrom durable import lock\n"
         "getattr(lock, sys.argv[2])(sys.argv[1])\nprint('held', flush=True)\ntime.sleep(600)\n")


def start_holder(folder: Path, mode: str = "exclusive") -> subprocess.Popen:
    """A process that takes `mode` ("exclusive" or "shared") on `folder` and sleeps; returns once it holds."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder), mode], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    line = proc.stdout.readline() if proc.stdout else ""
    if line.strip() != "held":
        proc.kill()
        raise RuntimeError(f"lock holder did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}")
    return proc


def kill(proc: subprocess.Popen) -> None:
    """kill -9, as a scheduler or the OOM killer would."""
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def holder(folder: Path, mode: str = "exclusive") -> Iterator[subprocess.Popen]:
    proc = start_holder(folder, mode)
    try:
        yield proc
    finally:
        kill(proc)
