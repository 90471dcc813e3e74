"""Data-parallel training under `torchrun` (torch.distributed: gloo on CPU, NCCL on CUDA).

The rule: W ranks with a global batch of B tokens compute what one process computes with batch B on
the same rows, up to float rounding. How each piece keeps it:
- Rows: every rank builds the same global batch plan (a pure function of seed, epoch and batch);
  rank r takes rows [r*n/W, (r+1)*n/W) of each global batch of n rows (`RankLoader`).
- Losses: the SAE's `global_losses` (sae/base.py) scales each per-token mean by W*n_r/n, so that the
  gradient all-reduce here (SUM / W, one flat buffer) gives the gradient of the global-batch mean;
  terms that are ratios over the batch (AuxK, whose normaliser is the global residual variance) are
  the SAE's to correct. The logged `fvu` uses the global batch mean.
- Initialisation: every rank initialises from the same global first batch, then rank 0's weights
  and buffers are broadcast, so the ranks start bitwise equal.
- Dead-latent counters: the fired mask is OR-reduced (SUM of counts > 0) and counted in global tokens.
- Whatever an architecture computes over the global batch (a batch-level selection, a threshold
  estimate) it computes itself through the `Collective` this class implements (`sae.use_collective`).
- Metrics are reduced (token-weighted means; `loss` is the global total) on every rank; only rank 0
  writes checkpoints, metrics.jsonl, wandb and the final SAE.
- The job stops as a whole: a signal torchrun forwards stops every rank at one step (train.preempt), and
  a worker whose launcher is gone (a kill -9 of torchrun) sends itself SIGTERM (durable.launcher), so
  it checkpoints and stops with the others instead of finishing the run alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from durable.launcher import watch_launcher

# A peer that dies makes gloo fail the survivors' next collective; this bounds a silent hang.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 outside torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


@dataclass
class DataParallel:
    """This process's place in a data-parallel run, and the reductions the training step needs; an
    SAE's `Collective` (sae/collective.py)."""

    rank: int
    world: int
    local_rank: int = 0

    @classmethod
    def start(cls, device: torch.device) -> DataParallel | None:
        """Join the process group that torchrun describes (None when not under torchrun with W > 1).
        Returns the instance; `device` decides the backend (NCCL on CUDA, else gloo)."""
        world = env_world_size()
        if world <= 1:
            return None
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        watch_launcher()  # a kill -9 of torchrun stops this worker too (durable.launcher), before it joins
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(local_rank)
            dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
        return cls(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """One GPU per local rank; CPU stays CPU."""
        return torch.device("cuda", self.local_rank) if device.type == "cuda" else device

    def rows(self, n: int) -> tuple[int, int]:
        """This rank's half-open row range of a global batch of n rows."""
        return self.rank * n // self.world, (self.rank + 1) * n // self.world

    def check_batches(self, batch_size: int, rows_per_epoch: int) -> None:
        """Every rank must get at least one row of every batch (the short last one included)."""
        last = rows_per_epoch % batch_size or batch_size
        if min(batch_size, last) < self.world:
            raise ValueError(
                f"training.batch_size={batch_size} over {rows_per_epoch} rows leaves a batch of {last} rows, "
                f"fewer than the {self.world} ranks; choose a batch_size so that the last batch of an epoch "
                f"has at least {self.world} rows")

    def all_sum(self, t: Tensor) -> Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_min(self, t: Tensor) -> Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t

    def all_gather(self, t: Tensor) -> list[Tensor]:
        gathered = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(gathered, t)
        return gathered

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank."""
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, src=0)

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()

    def close(self, *, normal_end: bool = True) -> None:
        """Leave the process group. After a normal end every rank first waits for the others at a
        barrier, as the harvest does: a rank that tore its gloo connections down while a peer was still
        finishing its last collective once aborted at exit ("terminate called without an active
        exception") in a loaded test run. On an error path (`normal_end=False`) it leaves at once: the
        other ranks may never reach a barrier."""
        if dist.is_initialized():
            if normal_end:
                dist.barrier()
            dist.destroy_process_group()

    # ---- the step ----------------------------------------------------------------------------
    def reduce_grads(self, module: torch.nn.Module) -> None:
        """Average .grad over ranks in one flat all-reduce (parameters without a gradient are skipped:
        which parameters get one is the same on every rank)."""
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        if not grads:
            return
        dense = [g.to_dense() if g.is_sparse else g for g in grads]
        flat = torch.cat([g.reshape(-1) for g in dense])
        self.all_sum(flat).div_(self.world)
        offset = 0
        for p, g in zip([p for p in module.parameters() if p.grad is not None], dense, strict=True):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g)
            offset += n

    def fired(self, fired: Tensor) -> Tensor:
        """[d_sae] bool: fired on any rank."""
        return self.all_sum(fired.to(torch.int32)) > 0

    def metrics(self, losses: dict[str, Tensor], l0_sum: float, n_local: int,
                ratio_terms: tuple[str, ...] = ()) -> dict[str, float]:
        """Global metric values from the terms of the SAE's `global_losses` (same keys on every rank):
        `loss` the global total, `fvu` and the `ratio_terms` (shares) the global ones, other terms
        token-weighted means."""
        keys = sorted(k for k in losses if k not in ("total", "fvu"))
        parts = [losses["total"].detach().double() / self.world]
        for k in keys:
            v = losses[k].detach().double()
            parts.append(v / self.world if k in ratio_terms else v * n_local)
        device = parts[0].device
        parts += [torch.tensor(l0_sum, dtype=torch.float64, device=device),
                  torch.tensor(n_local, dtype=torch.float64, device=device)]
        reduced = self.all_sum(torch.stack([p.reshape(()) for p in parts])).tolist()
        n = reduced[-1]
        record = {"loss": reduced[0], "l0": reduced[-2] / n, "fvu": float(losses["fvu"])}
        for k, v in zip(keys, reduced[1:-2], strict=True):
            record[k] = v if k in ratio_terms else v / n
        return record


class RankLoader:
    """This rank's rows of a global loader's batches: rows [r*n/W, (r+1)*n/W) of every batch.
    Same interface as ActivationLoader for the loop (`batches`, `batches_per_epoch`, `close`)."""

    def __init__(self, loader: Any, dp: DataParallel):
        self.loader, self.dp = loader, dp
        self.batches_per_epoch = loader.batches_per_epoch
        self.rows_per_epoch = loader.rows_per_epoch

    def batches(self, epoch: int = 0, batch: int = 0) -> Iterator[Any]:
        inner = self.loader.batches(epoch, batch)
        try:
            for item in inner:
                lo, hi = self.dp.rows(item.x.shape[0])
                yield replace(item, x=item.x[lo:hi])
        finally:
            inner.close()  # stops the global loader's reader thread

    def close(self) -> None:
        self.loader.close()
