"""The optimisation step and the loop around it.

One step (`train_step`), in this order:
  lr from the schedule -> forward (without dense latents where the SAE's `sparse_acts` allows) ->
  loss(out, lambda * warm-up, dead_mask) (under torchrun: `sae.global_losses`) -> backward -> remove
  the decoder-parallel gradient -> clip -> Adam -> renormalise the decoder -> `sae.update_after_step`,
  and from `threshold_start_step` on `sae.estimate_threshold` -> dead counters from `sae.fired(out)`,
  in tokens. Every architecture-specific choice is a hook of the SAE (sae/base.py); this module names
  no architecture.

The loop (`run_loop`) feeds batches from any loader with `batches(epoch, batch)` and
`batches_per_epoch` (train/data.py's ActivationLoader, or train/tensor_loader.py's TensorLoader),
logs every `log_every` steps, checkpoints through a callback, and stops on a non-finite loss
without letting it reach a checkpoint. Non-finiteness is tracked on the device (no sync per step)
and checked at every log and checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from native.heap import retain_freed_memory
from sae import BaseSAE
from settings import TrainingConfig
from train.data import rows_on
from train.distributed import DataParallel
from train.plan import RunPlan
from train.precision import autocast_for, compute_dtype
from train.schedule import sparsity_factor


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped before anything bad was saved."""

    def __init__(self, step: int, kept: str | None = None):
        self.step = step
        kept_msg = f"the last good checkpoint ({kept}) is kept" if kept else "no checkpoint had been written yet"
        super().__init__(
            f"loss is NaN or infinite at step {step}; training stopped and {kept_msg}. "
            "Try a lower training.lr, keep training.gradient_clip_norm set (e.g. 1.0), or check the cache "
            "with `python -m cache verify <cache>`; then rerun (with --resume to continue from the checkpoint)."
        )


@dataclass
class TrainState:
    """Everything that changes as training goes; with the weights and Adam, a checkpoint."""

    tokens_since_fired: Tensor  # [d_sae] int64: tokens since each latent last fired
    step: int = 0  # optimiser steps done
    tokens: int = 0  # tokens consumed
    epoch: int = 0  # loader position of the next batch
    batch: int = 0
    train_seconds: float = 0.0
    nonfinite_step: Tensor = field(default_factory=lambda: torch.tensor(-1))  # first bad step, -1 = none

    @classmethod
    def fresh(cls, d_sae: int, device: torch.device | str = "cpu") -> TrainState:
        return cls(
            tokens_since_fired=torch.zeros(d_sae, dtype=torch.int64, device=device),
            nonfinite_step=torch.tensor(-1, device=device),
        )

    def scalars(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "epoch": self.epoch, "batch": self.batch,
                "train_seconds": self.train_seconds}


@dataclass
class Stepper:
    """What `train_step` needs besides the batch and the state."""

    sae: BaseSAE
    optimizer: torch.optim.Optimizer
    plan: RunPlan
    lr: float
    l1_coefficient: float = 0.0
    clip_norm: float | None = 1.0
    normalize_decoder: bool = True
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    forward: Callable[..., dict[str, Tensor]] | None = None  # e.g. torch.compile(sae); default the SAE
    forward_kwargs: dict[str, Any] = field(default_factory=dict)
    dp: DataParallel | None = None  # under torchrun, else None
    dtype: str = "float32"  # what the matmuls run in (train/precision.py), for the run summary

    @classmethod
    def from_config(cls, sae: BaseSAE, optimizer: torch.optim.Optimizer, plan: RunPlan, t: TrainingConfig,
                    device: torch.device, dp: DataParallel | None = None) -> Stepper:
        used = compute_dtype(t.dtype, device, sae.bf16_auto)
        if device.type == "cpu":
            retain_freed_memory()  # the step's large blocks stay in the heap between steps (native/heap.py)
        return cls(
            sae=sae, optimizer=optimizer, plan=plan, lr=t.lr, l1_coefficient=t.l1_coefficient,
            clip_norm=t.gradient_clip_norm, normalize_decoder=t.normalize_decoder,
            # bf16 compute, float32 master weights and optimiser state: autocast leaves parameters alone
            autocast=autocast_for(used, device), dtype=used,
            forward=torch.compile(sae) if t.compile else None,
            forward_kwargs=sparse_forward_kwargs(sae), dp=dp,
        )


def make_optimizer(sae: BaseSAE, t: TrainingConfig) -> torch.optim.Adam:
    """Adam over the SAE's parameters: the fused kernel (one pass over each parameter, its gradient and
    both moments; no host sync for the step count) where torch has it for these parameters, else the
    foreach one. Either way the moments are float32 (the parameters' dtype)."""
    if len(t.betas) != 2:
        raise ValueError(f"training.betas must hold two numbers, got {t.betas}")
    params = list(sae.parameters())
    kwargs: dict[str, Any] = {"lr": t.lr, "betas": (t.betas[0], t.betas[1]), "eps": t.eps}
    if fused_adam_supported(params):
        return torch.optim.Adam(params, fused=True, **kwargs)
    return torch.optim.Adam(params, foreach=True, **kwargs)


def fused_adam_supported(params: Sequence[Tensor]) -> bool:
    """torch's fused Adam takes floating-point parameters on CPU and CUDA, all on one device type. Only
    contiguous ones: its CPU kernel walks a parameter, its gradient and its moments as flat memory, so a
    transposed parameter (tied_init's encoder) whose moments come back contiguous from a checkpoint
    pairs the wrong elements, and resume stops being bitwise (tests/train/test_loop.py)."""
    types = {p.device.type for p in params}
    return (len(types) == 1 and types <= {"cpu", "cuda"}
            and all(p.is_floating_point() and p.is_contiguous() for p in params))


def sparse_forward_kwargs(sae: BaseSAE) -> dict[str, Any]:
    """`dense_acts=False` for SAEs whose forward can skip the dense [B, d_sae] latents (`sparse_acts`)."""
    return {"dense_acts": False} if sae.sparse_acts else {}


def train_step(s: Stepper, x: Tensor, state: TrainState) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """One optimiser step on x [B, d] (routed: [B, L, d]) already on the device. Updates `state`."""
    sae, opt, step = s.sae, s.optimizer, state.step
    for group in opt.param_groups:
        group["lr"] = s.lr * s.plan.lr.factor(step)
    dead_mask = state.tokens_since_fired >= s.plan.dead_threshold_tokens
    l1 = s.l1_coefficient * sparsity_factor(step, s.plan.sparsity_warmup_steps)
    with s.autocast():
        out = (sae if s.forward is None else s.forward)(x, **s.forward_kwargs)
        losses = sae.loss(out, l1_coefficient=l1, dead_mask=dead_mask)
    n_tokens = x.shape[0]
    if s.dp is not None:  # the global batch's loss (the SAE computes it through its collective)
        losses, n_tokens = sae.global_losses(out, losses)
    opt.zero_grad(set_to_none=True)
    losses["total"].backward()
    if s.dp is not None:
        s.dp.reduce_grads(sae)
    if s.normalize_decoder:
        sae.remove_parallel_grads()
    if s.clip_norm:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), s.clip_norm)
    opt.step()
    if s.normalize_decoder:
        sae.normalize_decoder()
    sae.update_after_step(out)
    if step >= s.plan.threshold_start_step:
        sae.estimate_threshold(out)
    _count_tokens(sae, out, state, n_tokens, s.dp)
    bad = ~torch.isfinite(losses["total"].detach())
    state.nonfinite_step = torch.where(bad & (state.nonfinite_step < 0), step, state.nonfinite_step)
    state.step += 1
    state.tokens += n_tokens
    return out, losses


@torch.no_grad()
def _count_tokens(sae: BaseSAE, out: dict[str, Tensor], state: TrainState, n_tokens: int,
                  dp: DataParallel | None = None) -> None:
    fired = sae.fired(out) if dp is None else dp.fired(sae.fired(out))
    state.tokens_since_fired = torch.where(fired, 0, state.tokens_since_fired + n_tokens)


@torch.no_grad()
def batch_metrics(sae: BaseSAE, out: dict[str, Tensor], losses: dict[str, Tensor], state: TrainState,
                  plan: RunPlan, dp: DataParallel | None = None) -> dict[str, float]:
    """Loss terms, L0 (mean non-zero latents per token), batch-form FVU
    (sum ||x - xhat||^2 / sum ||x - mean_batch(x)||^2) and the dead fraction (under torchrun: of
    the global batch, from every rank; a collective)."""
    dead = (state.tokens_since_fired >= plan.dead_threshold_tokens).float().mean().item()
    if dp is not None:
        n_local = out["target"].shape[0]
        return {**dp.metrics(losses, latent_l0(out) * n_local, n_local, sae.ratio_terms), "dead_fraction": dead}
    target, recon = out["target"].float(), out["sae_out"].float()
    fvu = (target - recon).pow(2).sum() / (target - target.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
    record = {"loss": losses["total"].item(), **{k: v.item() for k, v in losses.items() if k != "total"}}
    record.update(l0=latent_l0(out), fvu=fvu.item(), dead_fraction=dead)
    return record


def latent_l0(out: dict[str, Tensor]) -> float:
    """Mean number of non-zero latents per token, from whichever form the forward returned: dense
    `feature_acts` [B, d_sae], or the kept entries (`sel_val` [N] flat, `top_val` [B, k])."""
    if "feature_acts" in out:
        return (out["feature_acts"] != 0).sum(dim=-1).float().mean().item()
    for key in ("sel_val", "top_val"):
        if key in out:
            return (out[key] != 0).sum().item() / out["target"].shape[0]
    return math.nan


LoopCallback = Callable[[TrainState], None]


@dataclass
class LoopHooks:
    """What the loop calls out to: `log(record)` every log_every steps and at the end,
    `checkpoint(state)` every checkpoint_every steps and at the end, `after_step(state)` after
    every step (tests use it to simulate a kill)."""

    log: Callable[[dict[str, Any]], None] = lambda record: None
    checkpoint: LoopCallback = lambda state: None
    after_step: Iterable[LoopCallback] = ()
    progress: Callable[[int], None] = lambda n: None


def run_loop(s: Stepper, loader: Any, state: TrainState, hooks: LoopHooks, device: torch.device) -> TrainState:
    """Train from `state` (its loader position) until `plan.total_steps`. Raises NonFiniteLossError
    at the first log or checkpoint after a non-finite loss; nothing non-finite is checkpointed."""
    plan = s.plan
    if state.step >= plan.total_steps:
        return state
    meter = _Meter(state)
    batches = loader.batches(state.epoch, state.batch)
    try:
        for batch, x in _on_device(batches, device):
            out, losses = train_step(s, x, state)
            state.epoch, state.batch = _next_position(batch.epoch, batch.index, plan.batches_per_epoch)
            hooks.progress(1)
            done = state.step >= plan.total_steps
            if done or state.step % plan.log_every == 0:
                _check_finite(state)
                record = batch_metrics(s.sae, out, losses, state, plan, s.dp)
                hooks.log({"step": state.step, "tokens": state.tokens, **record,
                           "lr": s.optimizer.param_groups[0]["lr"], "tokens_per_s": meter.rate(state)})
            if done or state.step % plan.checkpoint_every == 0:
                _check_finite(state, s.sae)
                state.train_seconds = meter.seconds(state)
                hooks.checkpoint(state)
            for callback in hooks.after_step:
                callback(state)
            if done:
                break
    finally:
        state.train_seconds = meter.seconds(state)
        if hasattr(batches, "close"):
            batches.close()
    return state


def _on_device(batches: Iterable[Any], device: torch.device) -> Iterator[tuple[Any, Tensor]]:
    """(batch, its rows on `device`). On a GPU the next batch is pinned and its copy queued before the
    current one is handed to the step, so it is on the device when that step ends. On a CPU the
    loader's reader thread already holds the next batches ready (train/data.py, `prefetch`)."""
    tables: dict = {}  # an 8-bit loader's column scales on the device (train.data.rows_on)
    if device.type != "cuda":
        for batch in batches:
            yield batch, rows_on(batch, device, tables=tables)
        return
    it = iter(batches)
    ahead = next(it, None)
    pending = None if ahead is None else (ahead, rows_on(ahead, device, pin=True, tables=tables))
    while pending is not None:
        current = pending
        ahead = next(it, None)
        pending = None if ahead is None else (ahead, rows_on(ahead, device, pin=True, tables=tables))
        yield current


def _next_position(epoch: int, index: int, per_epoch: int) -> tuple[int, int]:
    return (epoch + 1, 0) if index + 1 >= per_epoch else (epoch, index + 1)


def _check_finite(state: TrainState, sae: BaseSAE | None = None) -> None:
    bad = int(state.nonfinite_step.item())
    if bad >= 0:
        raise NonFiniteLossError(bad)
    # A finite loss can still take a step to non-finite weights (the last step before a checkpoint).
    if sae is not None and not all(bool(torch.isfinite(p).all()) for p in sae.parameters()):
        raise NonFiniteLossError(state.step - 1)


class _Meter:
    """Wall-clock tokens/s since the previous log, and total training seconds across resumes."""

    def __init__(self, state: TrainState):
        self.start, self.base = time.perf_counter(), state.train_seconds
        self.last_time, self.last_tokens = self.start, state.tokens

    def rate(self, state: TrainState) -> float:
        now = time.perf_counter()
        rate = (state.tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_tokens = now, state.tokens
        return rate

    def seconds(self, state: TrainState) -> float:
        return self.base + time.perf_counter() - self.start
