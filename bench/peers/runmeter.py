"""What every worker measures the same way: step end times, throughput, peak memory, the result file.

Throughput ("steady"): tokens of the full batches after the first, over the summed time of those
steps. That leaves out the set-up, the first step (allocation, first buffer fill) and the short last
batch for every implementation alike, and keeps everything the loop does per step (data, forward,
backward, optimiser, logging, checkpoints). Under a `Gate` the steps of several workers take turns,
and only a worker's own steps are timed, not its waits.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

COMMON_LR = 4e-4  # ANCHORS.md's common setting


def worker_parser(description: str, arches: tuple[str, ...]) -> argparse.ArgumentParser:
    """The command line every worker takes from bench_peers.py; a worker adds its own options."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--arch", choices=arches, default=arches[0] if len(arches) == 1 else None,
                   required=len(arches) > 1)
    p.add_argument("--work", type=Path, required=True, help="folder holding stream.json (bench_peers.py)")
    p.add_argument("--out", type=Path, required=True, help="result JSON to write")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lr", type=float, default=COMMON_LR, help="Adam lr, constant (the common setting: 4e-4)")
    p.add_argument("--gate", default=None, help="GO_FD,READY_FD: take turns with other workers (bench_peers.py)")
    return p


class Gate:
    """Lockstep with bench_peers.py, so that load from other processes hits every implementation
    alike: after each step the worker writes b"r" and blocks until it reads b"g". Closing it (after
    the last step) tells the orchestrator that this worker is done."""

    def __init__(self, fd_go: int, fd_ready: int):
        self.fd_go, self.fd_ready = fd_go, fd_ready

    @classmethod
    def from_arg(cls, spec: str | None) -> Gate | None:
        """'GO_FD,READY_FD' (file descriptors inherited from the orchestrator), or None: run freely."""
        if not spec:
            return None
        go, ready = (int(v) for v in spec.split(","))
        return cls(go, ready)

    def wait_go(self) -> None:
        os.write(self.fd_ready, b"r")
        if os.read(self.fd_go, 1) != b"g":
            raise SystemExit("bench_peers.py closed the lockstep gate before this worker finished")

    def close(self) -> None:
        os.close(self.fd_ready)
        os.close(self.fd_go)


class StepClock:
    """`step_end()` after each of the `n_steps` training steps (or when the next batch is requested).
    Each step's own time runs from its start (the previous step's end, or the gate's go) to its end."""

    def __init__(self, n_steps: int, gate: Gate | None = None) -> None:
        self.n_steps, self.gate, self.gated = n_steps, gate, gate is not None
        self.start = time.perf_counter()
        self.begins: list[float] = [self.start]
        self.ends: list[float] = []

    def step_end(self) -> None:
        now = time.perf_counter()
        self.ends.append(now)
        if len(self.ends) >= self.n_steps:
            if self.gate is not None:
                self.gate.close()
                self.gate = None
            return
        if self.gate is not None:
            self.gate.wait_go()
            now = time.perf_counter()
        self.begins.append(now)

    def rates(self, batch_rows: list[int]) -> dict[str, float]:
        """-> steady tokens/s (see module doc), wall tokens/s of the whole loop (waits included when
        gated), and step-time quantiles in ms."""
        n = len(self.ends)
        if n != len(batch_rows) or n != self.n_steps or n < 3:
            raise ValueError(f"{n} step ends for {len(batch_rows)} batches; need one per batch and at least 3")
        steps = [b - a for a, b in zip(self.begins[1:n - 1], self.ends[1:n - 1], strict=True)]
        ordered = sorted(steps)
        return {
            "tokens_per_s": sum(batch_rows[1:n - 1]) / sum(steps),
            "wall_tokens_per_s": sum(batch_rows) / (self.ends[-1] - self.start),
            "step_ms_median": 1e3 * ordered[len(ordered) // 2],
            "step_ms_max": 1e3 * ordered[-1],
            "steps": n,
            "tokens": sum(batch_rows),
            "gated": self.gated,
        }


def peak_rss_bytes() -> int:
    """This process's peak resident set (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def write_result(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, path)
