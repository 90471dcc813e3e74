"""One pass over the cache for every member of a sweep.

Each member runs the ordinary single-run code (`train.run.train`) on its own thread, so its run
folder, resume, checkpoints, non-finite stop and summary are exactly a solo run's; only its batch
source differs: a `MemberFeed` that asks this module for batch (epoch, index) instead of reading the
cache. One reader (an ActivationLoader over the union of the members' layers) reads each batch once;
a member's batch is its layers' rows of it ([B, d], or [B, L, d] for routed SAEs), contiguous, as its
own loader would have made it.

The threads take turns (a baton): exactly one of them (a member, or the reader) runs at any time,
and the members step on each batch in the sweep's order. So a member's arithmetic is that of its solo
run: same code, same order of operations, same thread count, and its own torch RNG state (swapped in
and out at every turn, as a checkpoint saves and restores it). The reader's prefetch thread goes on
reading while members step. A member that raises a user error (a non-finite loss, say) stops alone
and is reported; any other exception (a bug, a kill) stops the sweep, each member where it stands
(their last checkpoints stay: `--resume` continues every member).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from cache import Cache
from train.build import LayerChoice
from train.data import ActivationLoader, Batch
from train.distributed import DataParallel
from train.loop import TrainState
from train.snapshot import rng_from_tensors, rng_to_tensors

Position = tuple[int, int]


class SweepAborted(Exception):  # noqa: N818 - it is the sweep's stop, not an error of the member
    """Raised inside a member's thread when the sweep stops (another thread failed, or a kill)."""


@dataclass
class Outcome:
    """How one member ended: done (with its train_summary), stopped (a user error, `reason`), or
    aborted / not run (the sweep stopped first)."""

    name: str
    status: str  # done | stopped | aborted
    reason: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    run_dir: str | None = None
    error: BaseException | None = None


class _Member:
    def __init__(self, index: int, name: str, cfg: Any) -> None:
        self.index, self.name, self.cfg = index, name, cfg
        self.want: Position | None = None  # the batch it waits for (None: running, or ended)
        self.batch: torch.Tensor | None = None
        self.layers: list[int] | None = None  # the cache layers its batches hold, in order
        self.stacked = False
        self.rng: dict[str, torch.Tensor] | None = None
        self.ended = False
        self.outcome: Outcome | None = None


class OnePass:
    """Runs members' `train` calls in turns over one shared reader. Use `run()` once."""

    def __init__(self, members: list[tuple[str, Any]], *, say: Callable[[str], None],
                 dp: DataParallel | None = None,
                 after_step: Callable[[str, TrainState], None] | None = None,
                 user_errors: tuple[type[BaseException], ...] = ()) -> None:
        self.members = [_Member(i, n, c) for i, (n, c) in enumerate(members)]
        self.say, self.dp, self.after_step, self.user_errors = say, dp, after_step, user_errors
        self._cv = threading.Condition()
        self._turn: int | None = None  # member index that may run; None: the reader
        self._abort = False
        self.reader: ActivationLoader | None = None
        self.reader_layers: list[int] = []
        self.batches_read = 0

    # ---- the members' side --------------------------------------------------------------------
    def feed(self, member: _Member) -> Callable[[Cache, LayerChoice, Any], MemberFeed]:
        def make(data: Cache, choice: LayerChoice, t: Any) -> MemberFeed:
            member.layers, member.stacked = list(choice.layers), choice.routed
            missing = [x for x in member.layers if x not in self.reader_layers]
            if missing:  # the sweep lists every member's layers before it starts: a bug if not
                raise RuntimeError(f"sweep member {member.name} reads layers {missing} that the sweep's reader "
                                   f"does not ({self.reader_layers})")
            self._ensure_reader(data, t)
            assert self.reader is not None
            return MemberFeed(self, member, self.reader.batches_per_epoch, self.reader.rows_per_epoch)
        return make

    def request(self, member: _Member, pos: Position) -> torch.Tensor:
        """In a member's thread: wait for batch `pos` (the reader's turn until then)."""
        member.want = pos
        self._yield_to_reader(member)
        member.want = None
        if member.batch is None:
            raise SweepAborted("the sweep stopped")
        batch, member.batch = member.batch, None
        return batch

    def _yield_to_reader(self, member: _Member) -> None:
        member.rng = rng_to_tensors()
        with self._cv:
            self._turn = None
            self._cv.notify_all()
            self._cv.wait_for(lambda: self._turn == member.index)
        rng_from_tensors(member.rng)
        if self._abort:
            member.batch = None

    def _thread(self, member: _Member) -> None:
        from train.run import train

        with self._cv:
            self._cv.wait_for(lambda: self._turn == member.index)
        try:
            if self._abort:
                raise SweepAborted("the sweep stopped before this member started")
            hooks = [] if self.after_step is None else [lambda st: self.after_step(member.name, st)]  # type: ignore[misc]
            result = train(member.cfg, loader=self.feed(member), dp=self.dp, after_step=hooks,
                           say=lambda msg: self.say(f"[{member.name}] {msg}"))
            member.outcome = Outcome(member.name, "done", summary=result.summary, run_dir=str(result.run_dir))
        except SweepAborted as e:
            member.outcome = Outcome(member.name, "aborted", reason=str(e))
        except self.user_errors as e:
            member.outcome = Outcome(member.name, "stopped", reason=str(e), error=e)
        except BaseException as e:  # noqa: BLE001 - handed to the reader, which stops the sweep
            member.outcome = Outcome(member.name, "failed", reason=f"{type(e).__name__}: {e}", error=e)
        finally:
            member.ended, member.want = True, None
            with self._cv:
                self._turn = None
                self._cv.notify_all()

    # ---- the reader's side --------------------------------------------------------------------
    def _ensure_reader(self, data: Cache, t: Any) -> None:
        # The first member to ask opens the reader; the members agree on its settings (sweep.spec.SHARED).
        if self.reader is None:
            # One layer: the loader's [B, d] form, whose copies are faster than the stacked one's.
            layers = self.reader_layers[0] if len(self.reader_layers) == 1 else self.reader_layers
            self.reader = ActivationLoader(data, layers, t.batch_size, seed=t.seed, buffer_rows=t.shuffle_buffer_rows)

    def _run_member(self, member: _Member) -> None:
        """Give `member` the turn; return when it waits for a batch or has ended."""
        with self._cv:
            self._turn = member.index
            self._cv.notify_all()
            self._cv.wait_for(lambda: self._turn is None)
        if member.outcome is not None and member.outcome.status == "failed":
            self._abort = True

    def run(self, layers: list[int]) -> list[Outcome]:
        """Every member to its end. `layers`: every cache layer any member reads (the reader's)."""
        self.reader_layers = sorted(layers)
        threads = [threading.Thread(target=self._thread, args=(m,), name=f"sweep-{m.name}", daemon=True)
                   for m in self.members]
        for th in threads:
            th.start()
        it: Iterator[Batch] | None = None
        next_pos: Position | None = None
        try:
            for m in self.members:  # each to its first batch request (or its end)
                self._run_member(m)
                if self._abort:
                    break
            while not self._abort:
                waiting = [m for m in self.members if not m.ended and m.want is not None]
                if not waiting:
                    break
                pos = min(m.want for m in waiting if m.want is not None)
                if it is None or next_pos != pos:
                    if it is not None:
                        it.close()  # type: ignore[attr-defined]
                    assert self.reader is not None
                    it = self.reader.batches(*pos)
                batch = next(it)
                self.batches_read += 1
                pos = (batch.epoch, batch.index)
                next_pos = batch.next_position
                for m in self.members:
                    while not self._abort and not m.ended and m.want == pos:
                        m.batch = self._rows_for(m, batch.x)
                        self._run_member(m)
        except BaseException:
            self._abort = True
            raise
        finally:
            if it is not None:
                it.close()  # type: ignore[attr-defined]
            if self._abort:
                for m in self.members:  # each raises SweepAborted where it next waits, and ends
                    while not m.ended:  # (one still mid-step when a Ctrl-C came first finishes the step)
                        self._run_member(m)
            for th in threads:
                th.join()
            if self.reader is not None:
                self.reader.close()
        return [m.outcome or Outcome(m.name, "aborted", reason="not run") for m in self.members]

    def _rows_for(self, member: _Member, x: torch.Tensor) -> torch.Tensor:
        """The member's layers of the shared batch x [B, L_all, d] (or [B, d]: one layer), as its own
        loader gives them; a copy, so that no member can change another's batch."""
        assert member.layers is not None
        if x.dim() == 2:
            x = x[:, None]
        idx = [self.reader_layers.index(layer) for layer in member.layers]
        if member.stacked:
            return x[:, idx].contiguous()
        return x[:, idx[0]].contiguous()

    @property
    def bytes_read(self) -> int:
        return 0 if self.reader is None else self.reader.bytes_read


class MemberFeed:
    """A member's batch source: the loader interface `train` uses (`batches`, `batches_per_epoch`,
    `rows_per_epoch`, `close`), served from the sweep's one pass."""

    bytes_read = 0  # the sweep's reader counts the reads

    def __init__(self, onepass: OnePass, member: _Member, batches_per_epoch: int, rows_per_epoch: int) -> None:
        self._pass, self._member = onepass, member
        self.batches_per_epoch, self.rows_per_epoch = batches_per_epoch, rows_per_epoch

    def batches(self, epoch: int = 0, batch: int = 0) -> Iterator[Batch]:
        epoch, batch = int(epoch), int(batch)
        if batch == self.batches_per_epoch:
            epoch, batch = epoch + 1, 0
        while True:
            x = self._pass.request(self._member, (epoch, batch))
            nxt = (epoch + 1, 0) if batch + 1 >= self.batches_per_epoch else (epoch, batch + 1)
            yield Batch(x, epoch, batch, nxt)
            epoch, batch = nxt

    def close(self) -> None:
        pass

