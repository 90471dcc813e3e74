"""Graceful preemption: cluster schedulers send SIGTERM (or SIGUSR1) before they kill, and a user
presses Ctrl-C. During training each of these finishes the step in progress, writes a checkpoint of
it, says how to resume and exits with the conventional status 128 + signal number. A second Ctrl-C
interrupts at once (the latest checkpoint stays the way back).

Under torchrun every rank checks, after each step, whether any rank was signalled (one small
all-reduce), so that all stop at the same step and rank 0 checkpoints it.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import torch

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Preempted(Exception):
    """Training stopped on a signal after a checkpoint; `signum` gives the exit status 128 + signum."""

    def __init__(self, signum: int, step: int, checkpoint: str | None, run_dir: Path) -> None:
        self.signum, self.step = signum, step
        saved = f"checkpoint {checkpoint} written" if checkpoint else "no checkpoint could be written"
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}: {saved} in {run_dir}; "
                         f"to continue, rerun the same command with --resume (make train ... RESUME=1)")


class StopRequests:
    """Records the first of SIGNALS while installed (main thread only; elsewhere it does nothing)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                # A signal ignored when we start stays ignored: a shell starts background jobs with
                # SIGINT ignored, and Ctrl-C in the terminal must not stop them.
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if self.signum is None:
            self.signum = signum

    def requested(self, dp: Any = None, device: torch.device | str = "cpu") -> bool:
        """Whether this process (or, under torchrun, any rank) was asked to stop."""
        if dp is None:
            return self.signum is not None
        flag = torch.tensor([1.0 if self.signum is not None else 0.0], device=device)
        asked = bool(dp.all_sum(flag).item() > 0)
        if asked and self.signum is None:
            self.signum = int(signal.SIGTERM)  # another rank's signal: stop the same way
        return asked
