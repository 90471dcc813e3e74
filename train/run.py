"""A training run from a config: open the cache, build, resume or start, loop, save, summarise.

Outputs in `<output_dir>/<run_name>/`: `config.yaml` (resolved), `metrics.jsonl`,
`checkpoints/step-*/`, and at the end `sae/` (safetensors + JSON) and `train_summary.json`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

import cache as cache_mod
import durable
import sae as zoo
from cache import Cache
from cache.names import HELDOUT
from durable import lock as durable_lock
from sae import BaseSAE
from sae.measure import measure
from sae.metrics import UNDEFINED_REASONS as METRIC_REASONS
from settings import Config, ConfigError, TrainingConfig, save_config, to_dict
from settings.device import resolve_device
from train.build import (
    BuildError,
    LayerChoice,
    build_sae,
    check_d_in,
    init_from_sample,
    input_scales,
    provenance,
    resolve_layers,
    sae_config,
)
from train.calibrate import calibration_batches
from train.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, write_checkpoint
from train.data import ActivationLoader, rows_on
from train.distributed import DataParallel, RankLoader
from train.layout import CONFIG_FILE, SAE_DIR, SUMMARY_FILE, checkpoint_name
from train.loop import LoopHooks, NonFiniteLossError, Stepper, TrainState, make_optimizer, run_loop
from train.metrics import MetricsLog
from train.plan import PlanError, RunPlan, describe, plan_run
from train.precision import TRAINING_DTYPES, compute_dtype, dtype_notes, precision_record
from train.preempt import Preempted, StopRequests
from train.resume import checkpoint_of, resolved_config, restore
from train.rundir import RunDirError, discard_if_empty, prepare_run_dir


class TrainError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions whose message is the whole story for a user (the CLI prints it, no traceback)."""
    return (TrainError, BuildError, CheckpointError, ConfigError, NonFiniteLossError, PlanError, RunDirError,
            cache_mod.DamagedShardError)


@dataclass
class RunResult:
    run_dir: Path
    state: TrainState
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Run:
    """The pieces of one run, built once."""

    cfg: Config
    cache: Any
    choice: LayerChoice
    loader: Any
    plan: RunPlan
    device: torch.device
    run_dir: Path
    resume: bool
    notes: list[str]
    resolved: Config  # cfg with the cache- and run-dependent defaults filled in (saved as config.yaml)
    dp: DataParallel | None = None  # under torchrun with more than one process
    locks: list[durable_lock.FolderLock] = field(default_factory=list)  # rank 0: the cache (shared), the run folder

    @property
    def is_main(self) -> bool:
        return self.dp is None or self.dp.is_main


LoaderFactory = Callable[[Cache, LayerChoice, TrainingConfig], Any]


def activation_loader(data: Cache, choice: LayerChoice, t: TrainingConfig) -> ActivationLoader:
    """The run's batches: every rank plans the same global batches (RankLoader hands each its rows)."""
    # An 8-bit cache is decoded on the GPU that trains (train.data.rows_on), on a CPU by the loader's thread.
    on_gpu = resolve_device(t.device, key="training.device").type == "cuda"
    return ActivationLoader(data, choice.loader_layers, t.batch_size, seed=t.seed, buffer_rows=t.shuffle_buffer_rows,
                            decode=not on_gpu)


def train(cfg: Config, *, after_step: Iterable[Callable[[TrainState], None]] = (),
          say: Callable[[str], None] | None = None, loader: LoaderFactory = activation_loader,
          dp: DataParallel | None | Literal["env"] = "env") -> RunResult:
    """Run training as `cfg` says (`training.resume` / `training.overwrite` included).

    `loader` makes the batch source (a sweep feeds its members from one shared pass); `dp` is the
    process group to train data-parallel in: "env" joins the one torchrun describes (and leaves it
    at the end), an explicit one or None is the caller's to manage."""
    say = say or (lambda msg: print(msg, file=sys.stderr))
    stops = StopRequests().install()  # SIGTERM/SIGINT/SIGUSR1: finish the step, checkpoint, exit
    try:
        return _train(cfg, after_step, say, stops, loader, dp)
    finally:
        stops.restore()


def _train(cfg: Config, after_step: Iterable[Callable[[TrainState], None]], say: Callable[[str], None],
           stops: StopRequests, loader: LoaderFactory = activation_loader,
           dp: DataParallel | None | Literal["env"] = "env") -> RunResult:
    run = _setup(cfg, loader, dp)
    if not run.is_main:
        say = lambda msg: None  # noqa: E731 - rank 0 speaks for the run
    try:
        for note in run.notes:
            say(note)
        model, optimizer, state = _model_and_state(run, say)
        state = _loop(run, model, optimizer, state, after_step, stops)
        if stops.requested(run.dp, run.device):  # the final checkpoint is written: stop before the evaluation
            kept = list_checkpoints(run.run_dir)
            raise Preempted(stops.signum or 15, state.step, kept[-1].name if kept else None, run.run_dir)
        summary = _finish(run, model, state) if run.is_main else {}
    except user_errors() as e:
        if run.dp is None:
            raise
        raise TrainError(f"rank {run.dp.rank} of {run.dp.world}: {e}") from e
    except Exception as e:
        if durable.is_disk_full(e):  # metrics, the final sae/, the summary: the one line, the way back
            where = "" if run.dp is None else f"rank {run.dp.rank} of {run.dp.world}: "
            raise TrainError(where + disk_full_message(run.run_dir, e)) from e
        if run.dp is not None:
            e.add_note(f"(raised on rank {run.dp.rank} of {run.dp.world})")
        raise
    finally:
        run.loader.close()
        if run.is_main and not run.resume:
            discard_if_empty(run.run_dir)  # a run refused before writing anything leaves no folder
        for lock in reversed(run.locks):
            lock.release()
    if run.dp is not None and dp == "env":
        run.dp.close()
    if run.is_main:
        say(f"done: {run.run_dir} (held-out FVU {summary['heldout']['fvu']}, L0 {summary['heldout']['l0']})")
    return RunResult(run.run_dir, state, summary)


def _setup(cfg: Config, make_loader: LoaderFactory = activation_loader,
           dp: DataParallel | None | Literal["env"] = "env") -> _Run:
    locks: list[durable_lock.FolderLock] = []
    try:
        return _setup_locked(cfg, locks, make_loader, dp)
    except BaseException:
        for lock in reversed(locks):
            lock.release()
        raise


def _setup_locked(cfg: Config, locks: list[durable_lock.FolderLock], make_loader: LoaderFactory = activation_loader,
                  dp: DataParallel | None | Literal["env"] = "env") -> _Run:
    t = cfg.training
    data = open_training_cache(t.cache)
    data.verify_reads = t.verify_reads  # each shard hashed when first mapped, on the loader's thread
    try:
        choice = resolve_layers(cfg.model, data.layers, str(data.path))
        d_in = check_d_in(cfg.model, data.d_model)
        sae_config(cfg.model, d_in, choice)  # refuse a bad model section before touching any folder
    except BuildError as e:
        raise TrainError(str(e)) from e
    device = resolve_device(t.device, key="training.device")
    if t.dtype not in TRAINING_DTYPES:
        raise TrainError(f"training.dtype={t.dtype!r} is not one of {TRAINING_DTYPES}")
    sae_cls = zoo.get(cfg.model.type)
    notes = dtype_notes(t.dtype, device, sae_cls.bf16_auto, sae_cls.type_name)
    if dp == "env":
        dp = DataParallel.start(device)
    if dp is not None:
        device = dp.device(device)
    if dp is None or dp.is_main:  # one holder per job
        try:
            locks.append(durable_lock.shared(data.path, "cache"))
        except durable_lock.LockHeld as e:
            raise TrainError(f"cannot train on training.cache={t.cache}: {e}") from None
        notes += locks[-1].notes
    loader = make_loader(data, choice, t)
    plan = plan_run(t, loader.rows_per_epoch, loader.batches_per_epoch)
    if dp is not None:
        try:
            dp.check_batches(t.batch_size, loader.rows_per_epoch)
        except ValueError as e:
            raise TrainError(str(e)) from e
        notes.append(f"data-parallel: {dp.world} processes, {t.batch_size} tokens per global batch")
    run_dir, resume, dir_notes = _run_dir(t, cfg.model.type, choice.layers, dp, locks)
    notes += choice.notes + dir_notes + describe(plan)
    resolved = resolved_config(cfg, data, choice, plan, run_dir)
    return _Run(cfg, data, choice, loader, plan, device, run_dir, resume, notes, resolved, dp, locks)


def _run_dir(t: Any, sae_type: str, layers: list[int], dp: DataParallel | None,
             locks: list[durable_lock.FolderLock]) -> tuple[Path, bool, list[str]]:
    """Rank 0 chooses, locks and prepares the run folder (a timestamped name must be one name; one
    lock holder per job); the others learn it, or rank 0's error, by broadcast."""
    if dp is None:
        run_dir, resume, notes, lock = prepare_run_dir(t, sae_type, layers)
        locks.append(lock)
        return run_dir, resume, notes
    shared: Any = None
    if dp.is_main:
        try:
            run_dir, resume, notes, lock = prepare_run_dir(t, sae_type, layers)
            locks.append(lock)
            shared = (run_dir, resume, notes)
        except RunDirError as e:
            shared = str(e)
    shared = dp.broadcast_object(shared)
    if isinstance(shared, str):
        raise RunDirError(shared)
    return shared


def open_training_cache(path: str) -> Any:
    """cache.open with the reason and the fix in the message when it fails."""
    try:
        return cache_mod.open(path)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise TrainError(f"cannot train on training.cache={path}: {e}") from e


def _model_and_state(run: _Run, say: Callable[[str], None]) -> tuple[Any, torch.optim.Optimizer, TrainState]:
    cfg, t = run.cfg, run.cfg.training
    scales = input_scales(run.cache, run.choice.layers)
    model = build_sae(cfg.model, run.cache.d_model, run.choice, scales, t.seed).to(run.device)
    if t.dtype == "float64":
        model = model.to(torch.float64)
    if run.dp is not None:
        model.use_collective(run.dp)
    optimizer = make_optimizer(model, t)
    state = TrainState.fresh(model.d_sae, run.device)
    ckpt = latest_checkpoint(run.run_dir) if run.resume else None
    if ckpt is not None:
        world, saved_world = run.dp.world if run.dp else 1, ckpt.meta.get("world_size", 1)
        if saved_world != world:
            raise TrainError(
                f"cannot resume {run.run_dir}: its checkpoint was written by {saved_world} process(es) and this "
                f"run has {world}; the batch split and the run's arithmetic depend on it: resume with "
                f"--nproc-per-node {saved_world} (NPROC={saved_world}), or start a new run")
        try:
            state = restore(ckpt, model, optimizer, run.resolved, run.cache, run.plan, run.device)
        except ValueError as e:
            raise TrainError(f"cannot resume {run.run_dir}: {e}") from e
        for skipped in ckpt.meta.get("skipped", []):
            say(f"skipped a damaged checkpoint: {skipped}")
        say(f"resuming {run.run_dir} at step {state.step} ({state.tokens:,} tokens)")
    else:
        batches = run.loader.batches(0, 0)  # the global first batch, on every rank
        try:
            init_from_sample(model, rows_on(next(batches), run.device))
        finally:
            batches.close()  # stops its reader thread
        if run.dp is not None:
            run.dp.broadcast_module(model)  # ranks start bitwise equal
    if run.is_main:
        save_config(run.resolved, run.run_dir / CONFIG_FILE)
    return model, optimizer, state


def _loop(run: _Run, model: Any, optimizer: torch.optim.Optimizer, state: TrainState,
          after_step: Iterable[Callable[[TrainState], None]], stops: StopRequests) -> TrainState:
    cfg = run.cfg
    log = MetricsLog(run.run_dir, total_steps=run.plan.total_steps, start_step=state.step, wandb_cfg=cfg.wandb,
                     run_name=run.run_dir.name, config=to_dict(run.resolved)) if run.is_main else None
    saved: list[Path] = []

    def save(st: TrainState) -> None:
        check_cache_unchanged(run.cache, st.step)
        ckpt = checkpoint_of(model, optimizer, st, run.resolved, run.cache, run.plan)
        ckpt.meta["world_size"] = run.dp.world if run.dp else 1
        saved[:] = [write_checkpoint(run.run_dir, ckpt)]

    def stop_if_asked(st: TrainState) -> None:
        """After the step (and its hooks): on a signal, checkpoint this step unless just done, and stop."""
        if st.step >= run.plan.total_steps or not stops.requested(run.dp, run.device):
            return  # the last step: the run checkpoints it and stops at _train's check
        if run.is_main and not (saved and saved[0].name == checkpoint_name(st.step)):
            save(st)
        raise Preempted(stops.signum or 15, st.step, checkpoint_name(st.step), run.run_dir)

    after_step = (*after_step, stop_if_asked)

    if log is not None:
        hooks = LoopHooks(log=log.log, checkpoint=save, after_step=tuple(after_step), progress=log.advance)
    else:  # ranks > 0 compute the same metrics (a collective) and drop them
        hooks = LoopHooks(after_step=tuple(after_step))
    stepper = Stepper.from_config(model, optimizer, run.plan, cfg.training, run.device, run.dp)
    loader = run.loader if run.dp is None else RankLoader(run.loader, run.dp)
    try:
        return run_loop(stepper, loader, state, hooks, run.device)
    except NonFiniteLossError as e:
        if not cfg.training.verify_reads and isinstance(run.cache, Cache):  # else the reads checked the values
            damaged = run.cache.non_finite("train", run.choice.loader_layers)
            if damaged is not None:  # the cache's values, not the learning rate
                raise damaged from None
        kept = list_checkpoints(run.run_dir)
        raise NonFiniteLossError(e.step, kept[-1].name if kept else None) from None
    finally:
        if log is not None:
            log.close()


def heldout_summary(model: BaseSAE, cache: Cache, layers: int | list[int], *, batch_size: int,
                    device: torch.device | str = "cpu", max_rows: int | None = None) -> dict[str, Any]:
    """{rows, fvu, l0, dead_fraction} on the held-out split in the SAE's inference mode: the figures
    of stage 3's eval.json (sae.measure), from the same implementation."""
    rows = cache.num_rows(HELDOUT) if max_rows is None else min(max_rows, cache.num_rows(HELDOUT))
    if rows <= 0:
        return {"rows": 0, "fvu": None, "l0": None, "dead_fraction": None}
    m = measure(model, cache.iter_rows(HELDOUT, layers, batch_size, max_rows), device=device)["metrics"]
    return {"rows": m["tokens"], "fvu": m["fvu"], "l0": m["l0"], "dead_fraction": m["dead_fraction"]}


def disk_full_message(run_dir: Path, exc: BaseException) -> str:
    kept = list_checkpoints(run_dir)
    state = f"checkpoint {kept[-1].name} is intact" if kept else "no checkpoint was written yet"
    detail = " ".join(str(exc).split())
    return (f"disk full while training into {run_dir} ({detail}); {state} and no partial file is kept: free space "
            f"and rerun with --resume (RESUME=1)")


def check_cache_unchanged(data: Any, step: int) -> None:
    """Stop with one line when the cache on disk is no longer the one this run opened (a writer that
    the lock could not stop: another host without shared locks, a copy over it)."""
    why = data.changed() if hasattr(data, "changed") else None
    if why is not None:
        raise TrainError(f"the cache {data.path} changed while this run read it ({why}) at step {step}; the rows "
                         f"read since may be of another cache: start a new run (--overwrite) on the cache as it is now")


SUMMARY_REASON = "the held-out split gave no usable value (a zero denominator or non-finite activations)"


def _finish(run: _Run, model: Any, state: TrainState) -> dict[str, Any]:
    t = run.cfg.training
    check_cache_unchanged(run.cache, state.step)
    meta = provenance(run.cache, run.choice, [float(s) for s in model.input_scale.tolist()], run.run_dir.name)
    meta["training"] = {"steps": state.step, "tokens": state.tokens, "seed": t.seed}
    calibration = model.calibrate(calibration_batches(run.cache, run.choice.loader_layers,
                                                      batch_size=t.batch_size, device=run.device))
    if calibration is not None:
        meta["threshold_calibration"] = calibration
    model.save(run.run_dir / SAE_DIR, meta=meta)
    heldout = heldout_summary(model, run.cache, run.choice.loader_layers, batch_size=t.batch_size,
                              device=run.device, max_rows=run.cfg.evaluate.max_tokens)
    summary = {
        "run": run.run_dir.name, "sae_type": model.cfg.type, "layers": run.choice.layers,
        "steps": state.step, "tokens": state.tokens, "epochs": state.tokens / run.plan.rows_per_epoch,
        "train_seconds": state.train_seconds,
        "cache_bytes_read": getattr(run.loader, "bytes_read", None),  # by this process's loader, for batches
        "precision": precision_record(t.dtype, compute_dtype(t.dtype, run.device, model.bf16_auto)),
        "tokens_per_s": state.tokens / state.train_seconds if state.train_seconds > 0 else None,
        "heldout": heldout,
        "threshold_calibration": calibration,
    }
    strict = durable.null_non_finite(summary, SUMMARY_REASON, METRIC_REASONS)  # a NaN metric: null + its reason
    durable.atomic_write_json(run.run_dir / SUMMARY_FILE, strict)
    return summary
