"""Choosing and preparing `<output_dir>/<run_name>/`: new, resumed, or replaced — never clobbered.

- A folder that exists is refused unless `training.resume` (continue it) or `training.overwrite`
  (replace it) is set.
- `overwrite` deletes only a folder that looks like a run (or is empty): never a user's folder.
- With no `run_name`, a new run is named `<type>-<layers>-<timestamp>`; `resume` without a name
  continues the newest run of that type and layers.
- The folder is held (durable.lock) from here to the end of the run: a second training on it is
  refused at once, naming the holder, before anything in it is read or deleted.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from durable import lock as durable_lock
from settings import TrainingConfig
from train.checkpoint import list_checkpoints
from train.layout import RUN_MARKERS


class RunDirError(ValueError):
    """A run folder that cannot be used as asked; the message says what to pass instead."""


def run_prefix(sae_type: str, layers: list[int]) -> str:
    span = f"L{layers[0]}" if len(layers) == 1 else f"L{layers[0]}-{layers[-1]}"
    return f"{sae_type.lower()}-{span}"


def prepare_run_dir(t: TrainingConfig, sae_type: str,
                    layers: list[int]) -> tuple[Path, bool, list[str], durable_lock.FolderLock]:
    """-> (run folder, resume from it?, notes for the log, the folder's lock: release it when the run
    ends). Creates the folder."""
    root = Path(t.output_dir)
    if t.run_name is None:
        if t.resume:
            run_dir = _newest_run(root, run_prefix(sae_type, layers))
        else:
            run_dir = root / f"{run_prefix(sae_type, layers)}-{time.strftime('%Y%m%d-%H%M%S')}"
    else:
        _check_name(t.run_name)
        run_dir = root / t.run_name
    return _prepare(run_dir, t.resume, t.overwrite)


def _has_content(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(run_dir.iterdir())


def _prepare(run_dir: Path, resume: bool,
             overwrite: bool) -> tuple[Path, bool, list[str], durable_lock.FolderLock]:
    if resume and overwrite:
        raise RunDirError("training.resume and training.overwrite are both set; choose one")
    if resume and not _has_content(run_dir):
        raise RunDirError(f"nothing to resume: {run_dir} does not exist; drop --resume to start a new run")
    try:
        lock = durable_lock.exclusive(run_dir, "run folder")
    except durable_lock.LockHeld as e:
        raise RunDirError(str(e)) from None
    try:
        path, resumed, notes = _decide(run_dir, resume, overwrite)
    except BaseException:
        lock.release()
        raise
    return path, resumed, lock.notes + notes, lock


def _decide(run_dir: Path, resume: bool, overwrite: bool) -> tuple[Path, bool, list[str]]:
    """With the folder held: what to do with it (and do it)."""
    exists = _has_content(run_dir)
    if resume:
        if not list_checkpoints(run_dir):
            return run_dir, False, [f"{run_dir} has no checkpoint yet: starting it again from step 0"]
        return run_dir, True, []
    if exists:
        if not overwrite:
            raise RunDirError(
                f"run folder {run_dir} already exists; pass --resume (RESUME=1) to continue it, --overwrite "
                "(OVERWRITE=1) to replace it, or choose another training.run_name"
            )
        if not any((run_dir / marker).exists() for marker in RUN_MARKERS):
            raise RunDirError(f"{run_dir} is not a training run folder (none of {RUN_MARKERS}); "
                              "refusing to delete it: choose another training.run_name or training.output_dir")
        shutil.rmtree(run_dir)  # its lock lives beside it (durable.lock), held by this process
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, False, [f"replaced {run_dir}"] if exists else []


def discard_if_empty(run_dir: Path) -> None:
    """Remove a run folder left empty by a run that stopped before writing anything in it (a cache
    refused at its first read): an empty folder would only be refused as "already exists" by the rerun.
    A folder holding anything is kept (rmdir removes only an empty one)."""
    try:
        run_dir.rmdir()
    except OSError:
        pass  # not empty, or already gone


def _newest_run(root: Path, prefix: str) -> Path:
    candidates = sorted(p for p in root.glob(prefix + "-*") if p.is_dir() and list_checkpoints(p))
    if not candidates:
        raise RunDirError(f"nothing to resume: no run named {prefix}-* with a checkpoint in {root}; "
                          "set training.run_name to the run to continue")
    return candidates[-1]


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise RunDirError(f"training.run_name={name!r} must be a plain folder name (no slashes)")
