"""Several shards in flight, committed in order.

Worker threads take emitted shards one each and *prepare* them (the writer's statistics where no
`early` step took them, checksum, the write under a temporary name, fsync): their work overlaps that of
the other workers and the producer's. A
committer thread *commits* (renames, one fsync of the folder, one manifest rewrite) the longest run of
prepared shards that follow the last committed shard of their split, all together: shards that finish
together share one manifest rewrite, and the manifest never lists a shard before its predecessors.
Commits are at least `commit_interval` seconds apart, so that shards finishing within that time share a
rewrite too: a manifest of a wide, many-layer cache is megabytes of JSON whose encoding holds the
interpreter lock, which every worker needs between its torch calls. A commit is not delayed when the
producer waits for one (max_uncommitted reached), for `drain`, or at the end.

At most `max_inflight` shards are emitted and not yet written (they hold the buffers: this bounds
memory), and at most `max_uncommitted` are emitted and not yet committed (what a crash can lose);
`submit` waits while either is reached. Written shards hold no buffers, so commits may lag behind the
writes and then take many shards at once when fsyncs are slow.

An optional `early` step (the writer's CPU statistics) runs on a thread of its own, on each shard in
emission order as soon as it is submitted; a worker waits for it before `prepare`. Workers that did
their shard's statistics themselves finished their writes together (the disk shares its bandwidth
evenly) and then all computed statistics at once, leaving the disk one stream for that time; with the
statistics ahead of them, a worker goes from one write to the next.

After a failure (shard k), shards emitted before k are still committed as they finish; k and
everything emitted after it is dropped (temporaries removed), and the error is raised by the
producer's next call, exactly as if the shards had been written one by one.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class Job:
    seq: int  # emission order over both splits
    split: str
    index: int
    name: str
    rows: int
    end: tuple[int, int]
    payload: object  # what `prepare` needs (the writer's)
    release: Callable[[], None]  # gives the shard's buffers back; called once, after prepare or instead of it
    result: object = None  # what `prepare` found, for `commit`
    failed: bool = field(default=False)
    early_done: threading.Event | None = None  # set once `early` ran on this job (None: no early step)
    early_error: BaseException | None = None


class Pipeline:
    """Worker threads that prepare jobs, a committer thread that commits them in order (module docstring)."""

    def __init__(self, *, prepare: Callable[[Job], None], commit: Callable[[list[Job]], None],
                 discard: Callable[[Job], None], next_index: dict[str, int], workers: int,
                 max_inflight: int, max_uncommitted: int, commit_interval: float = 0.0,
                 early: Callable[[Job], None] | None = None) -> None:
        self._prepare, self._commit, self._discard, self._early = prepare, commit, discard, early
        self._early_queue: deque[Job] = deque()
        self._interval = commit_interval
        self._last_commit = -math.inf
        self._draining = 0
        self._max_unwritten, self._max_unfinished = max_inflight, max(max_inflight, max_uncommitted)
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._ready: dict[str, dict[int, Job]] = {s: {} for s in next_index}
        self._next = dict(next_index)
        self._unfinished = 0
        self._error: BaseException | None = None
        self._unwritten: set[int] = set()  # seqs submitted and not yet prepared (or skipped): they hold buffers
        self._error_seq = math.inf
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._start(max(1, workers))

    def _start(self, workers: int) -> None:
        # Workers compute CPU statistics with torch: one intra-op thread each, so that they do not
        # fight the producer's threads. torch keeps the count per OS thread but also remembers the last
        # value set as the default for new threads, so the caller's count is set again afterwards.
        saved = torch.get_num_threads()
        loops = [(self._work, f"cache-writer-{i}") for i in range(workers)]
        if self._early is not None:
            loops.append((self._early_loop, "cache-stats"))
        started = threading.Barrier(len(loops) + 1)

        def run(loop: Callable[[], None]) -> None:
            torch.set_num_threads(1)
            started.wait()
            loop()

        for loop, name in loops:
            self._threads.append(threading.Thread(target=run, args=(loop,), name=name, daemon=True))
        self._threads.append(threading.Thread(target=self._commit_loop, name="cache-commit", daemon=True))
        for t in self._threads:
            t.start()
        started.wait()
        torch.set_num_threads(saved)

    @property
    def error(self) -> BaseException | None:
        """The error of the first failed shard in emission order, or None. Waits, when a shard has failed,
        for the shards emitted before it to finish: one of them may fail too, and the producer must be
        told of that one, as if the shards had been written one by one."""
        with self._cond:
            self._settle()
            return self._error

    def _settle(self) -> None:
        """Caller holds the lock: after a failure, wait until no earlier shard is still being prepared."""
        while self._error is not None and any(seq < self._error_seq for seq in self._unwritten):
            self._cond.wait()

    def _fail(self, seq: int, exc: BaseException) -> None:
        with self._cond:
            if seq < self._error_seq:
                self._error, self._error_seq = exc, seq
            self._cond.notify_all()

    # ---- producer side ------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue `job`, waiting while max_inflight shards are unwritten or max_uncommitted uncommitted.
        Raises the first error."""
        with self._cond:
            while (len(self._unwritten) >= self._max_unwritten or self._unfinished >= self._max_unfinished) \
                    and self._error is None:
                self._cond.wait()
            if self._error is not None:
                self._settle()
                job.release()
                raise self._error
            self._unwritten.add(job.seq)
            self._unfinished += 1
            if self._early is not None:
                job.early_done = threading.Event()
                self._early_queue.append(job)
            self._queue.append(job)
            self._cond.notify_all()

    def drain(self) -> None:
        """Wait until every submitted shard is committed or dropped; raise the first error."""
        with self._cond:
            self._draining += 1
            self._cond.notify_all()
            try:
                while self._unfinished:
                    self._cond.wait()
            finally:
                self._draining -= 1
            if self._error is not None:
                self._settle()
                raise self._error

    def close(self) -> None:
        """Let queued shards finish (committed, or dropped after an error), then stop the threads."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()
        self._threads = []

    # ---- threads ------------------------------------------------------------------------------
    def _take(self, queue: deque[Job]) -> tuple[Job, bool] | None:
        """The next job of `queue` and whether an earlier shard failed (skip it), waiting for one; None
        once the pipeline is stopping and the queue is empty."""
        with self._cond:
            while not queue and not self._stopping:
                self._cond.wait()
            if not queue:
                return None
            job = queue.popleft()
            return job, job.seq > self._error_seq

    def _early_loop(self) -> None:
        assert self._early is not None
        while (taken := self._take(self._early_queue)) is not None:
            job, skip = taken
            try:
                if not skip:
                    self._early(job)
            except BaseException as exc:  # raised by the worker that prepares this job
                job.early_error = exc
            finally:
                assert job.early_done is not None
                job.early_done.set()

    def _work(self) -> None:
        while (taken := self._take(self._queue)) is not None:
            job, skip = taken
            try:
                if job.early_done is not None:
                    job.early_done.wait()
                if skip or job.seq > self._error_seq:  # or one failed while the statistics ran
                    job.failed = True
                elif job.early_error is not None:
                    raise job.early_error
                else:
                    self._prepare(job)
            except BaseException as exc:  # surfaced to the producer on its next call
                job.failed = True
                self._fail(job.seq, exc)
            try:
                job.release()
            except BaseException as exc:  # a thread that dies here would leave the producer waiting forever
                job.failed = True
                self._fail(job.seq, exc)
            job.payload = None  # a written shard holds no rows: memory is bounded by the unwritten ones
            with self._cond:
                self._unwritten.discard(job.seq)
                self._ready[job.split][job.index] = job
                self._cond.notify_all()

    def _collect(self) -> tuple[list[Job], list[Job]]:
        """(prepared shards that can be committed now, shards to drop); caller holds the lock."""
        group, dropped = [], []
        for split, ready in self._ready.items():
            for index in [i for i, job in ready.items() if job.failed or job.seq > self._error_seq]:
                dropped.append(ready.pop(index))
            while self._next[split] in ready:
                group.append(ready.pop(self._next[split]))
                self._next[split] += 1
        return group, dropped

    def _due(self, held: int) -> float:
        """Seconds until the next commit of the `held` collected shards may run (0: now); caller holds
        the lock. At the end (drain, close) the last shards are committed as soon as they are all in
        hand; until then the interval still groups them."""
        if self._error is not None or self._unfinished >= self._max_unfinished:
            return 0.0
        if (self._draining or self._stopping) and held >= self._unfinished:
            return 0.0
        return max(0.0, self._last_commit + self._interval - time.monotonic())

    def _commit_loop(self) -> None:
        while True:
            with self._cond:
                group, dropped = self._collect()
                while not dropped and (not group or self._due(len(group)) > 0):
                    if self._stopping and not self._unfinished:
                        return
                    self._cond.wait(self._due(len(group)) if group else None)
                    more, dropped = self._collect()
                    group += more
                # A shard collected while the commit waited is dropped if an earlier one failed since.
                dropped += [job for job in group if job.seq > self._error_seq]
                group = [job for job in group if job.seq <= self._error_seq]
                self._last_commit = time.monotonic()
            for job in dropped:
                try:
                    self._discard(job)
                except BaseException as exc:
                    self._fail(job.seq, exc)
            if group:
                try:
                    self._commit(group)
                except BaseException as exc:
                    self._fail(min(job.seq for job in group), exc)
            with self._cond:
                self._unfinished -= len(group) + len(dropped)
                self._cond.notify_all()
