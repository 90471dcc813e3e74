"""A worker whose launcher is gone stops instead of finishing alone.

torchrun (torch.distributed.run) starts each worker in a session of its own, so a signal to the
launcher's process group reaches the launcher only. The signals it handles (SIGTERM, SIGINT, SIGHUP,
SIGQUIT; more with TORCHELASTIC_SIGNALS_TO_HANDLE) it forwards to every worker and waits for them;
SIGKILL it cannot forward, and its workers, reparented, would go on to the end: a rerun with --resume
would then be a second writer in the same folder.

`watch_launcher` starts a daemon thread in a torchrun worker that polls the parent pid. When the
launcher is gone it sends this process SIGTERM, which the stages already handle (training finishes the
step, rank 0 checkpoints it and every rank exits 143; a harvest commits its complete shards). Every rank
of the job sees its launcher go, so the ranks stop together. A process still running `grace` seconds
later (stuck in a collective whose peer is gone, say) exits at once, as torchrun itself kills a worker
30 s after forwarding a signal; what is on disk stays as safe as after a kill -9 (atomic writes; the
kernel releases the folder locks with the process).

A launcher killed before its worker started watching (in the seconds of its imports) is no longer the
worker's parent, so the worker cannot tell by its parent pid. torchrun's rendezvous store lives in the
launcher (TORCHELASTIC_USE_AGENT_STORE), so the worker asks whether anything still listens there: a
refused connection means the launcher is gone, and the worker stops (`LauncherGone`) instead of waiting
for the store until the process group's timeout.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import sys
import threading
from typing import NoReturn

# torchrun sets it in every worker's environment (and only there).
TORCHRUN_ENV = "TORCHELASTIC_RUN_ID"
POLL_SECONDS = 0.2
GRACE_SECONDS = 30.0  # torchrun's own shutdown timeout between a forwarded signal and SIGKILL

_watch: LauncherWatch | None = None


class LauncherGone(KeyboardInterrupt):
    """A torchrun worker found its launcher gone before it joined the job: it unwinds as on a stop
    signal (nothing of the job is written yet); `signum` is the one it stands for."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.signum = int(signal.SIGTERM)


class LauncherWatch:
    """Polls whether the parent process is still `parent`; see the module docstring."""

    def __init__(self, parent: int, who: str, poll: float = POLL_SECONDS, grace: float = GRACE_SECONDS) -> None:
        self.parent, self.who, self.poll, self.grace = parent, who, poll, grace
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="launcher-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while os.getppid() == self.parent:
            if self._closed.wait(self.poll):
                return
        _say(f"{self.who}the launcher (pid {self.parent}) is gone: stopping this process (SIGTERM) instead of "
             f"finishing the job alone")
        os.kill(os.getpid(), signal.SIGTERM)
        if self._closed.wait(self.grace):
            return
        _say(f"{self.who}still running {self.grace:g} s after its launcher went: exiting now (what is on disk is "
             f"as after a kill: rerun with --resume / rerun the harvest)")
        os._exit(128 + signal.SIGTERM)

    def close(self) -> None:
        """Stop watching (tests; a process that outlives its job)."""
        global _watch
        self._closed.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        atexit.unregister(self.close)
        if _watch is self:
            _watch = None


def watch_launcher(*, poll: float = POLL_SECONDS, grace: float = GRACE_SECONDS,
                   force: bool = False) -> LauncherWatch | None:
    """Under torchrun (or with `force`): watch the launcher, the parent of this process now; one watch
    per process, whoever asks again gets it. Outside torchrun: None. Call it before joining the process
    group, while the launcher that started this process is certainly its parent (torchrun's rendezvous
    store lives in the launcher, so a worker that outlived it cannot join)."""
    global _watch
    if _watch is not None:
        return _watch
    if not force and TORCHRUN_ENV not in os.environ:
        return None
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    who = f"rank {rank} of {world}: " if rank is not None and world is not None else ""
    _watch = LauncherWatch(os.getppid(), who, poll, grace)
    # Ended before the interpreter finalizes: a daemon thread still waiting then is stopped by
    # pthread_exit, which can abort the process ("terminate called without an active exception").
    atexit.register(_watch.close)
    store = _agent_store()
    if store is not None and _refused(*store):
        message = (f"{who}the launcher is gone (its rendezvous store at {store[0]}:{store[1]} refuses connections): "
                   f"stopping this process before it joins the job")
        _say(message)
        raise LauncherGone(message)
    return _watch


def _agent_store() -> tuple[str, int] | None:
    """Where the launcher's own rendezvous store listens, when the workers use it (torchrun's default)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        return None  # the store is rank 0's, and it may not listen yet
    try:
        return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    except (KeyError, ValueError):
        return None


def _refused(host: str, port: int) -> bool:
    """True only when the host answers that nothing listens (a timeout or an unknown host proves nothing)."""
    try:
        with socket.create_connection((host, port), timeout=10):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def _say(message: str) -> None:
    try:
        print(message, file=sys.stderr, flush=True)
    except (OSError, ValueError):  # stderr was the launcher's pipe, closed with it
        pass


def exit_process(status: int) -> NoReturn:
    """End a command line's process with `status`: `sys.exit` outside torchrun; in a torchrun worker,
    run the atexit handlers, flush stdout/stderr and `os._exit`, so that the interpreter's teardown
    (module and object finalization, C++ static destructors) never runs.

    Why: `dist.destroy_process_group()` does not stop the gloo backend: its C++ threads (two
    `pt_gloo_runloop`, one `gloo_tcp_loop`) still run after it, and still when the interpreter
    finalizes. A rank whose run had finished (barrier, destroy_process_group, everything written) at
    times died of SIGABRT, "terminate called without an active exception", under load on 2 CPU
    cores. Its core dump: the main thread in Py_FinalizeEx while a `pt_gloo_runloop` thread, late in
    dropping the final barrier's work (~AsyncBarrierWork), decref'd that work's tensor's PyObject;
    taking the GIL during finalization ends a thread with pthread_exit, whose unwinding through the
    noexcept destructor calls std::terminate. A barrier cannot close that window (the thread drops
    the work after waking the waiter). With `os._exit` the interpreter never finalizes, so nothing
    races it, and the exit status is the one the command returned.

    Only for the `if __name__ == "__main__"` line of our own torchrun entry points (train, the sweep,
    harvest), after `main()` returned: by then every file the run writes is closed and fsynced, and
    the kernel releases the folder locks with the process as after any exit. Never from library code:
    it ends the caller's process. An exception that escapes `main()` still takes the ordinary way out
    (its traceback, then the teardown)."""
    if TORCHRUN_ENV not in os.environ:
        sys.exit(status)
    atexit._run_exitfuncs()  # what a normal exit would run first (the launcher watch's close, logging's flush)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # the launcher's pipe is gone
            pass
    os._exit(status)
