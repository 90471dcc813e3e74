"""Training checkpoints: every tensor in safetensors, every scalar in JSON, nothing pickled.

Layout of `runs/<run>/checkpoints/step-00001234/`:
- `model.safetensors`: the SAE's state_dict (parameters and buffers such as BatchTopK's threshold);
- `optimizer.safetensors`: Adam's per-parameter state as `state.<param index>.<key>`;
- `state.safetensors`: the dead-latent counters and the RNG states (uint8 tensors);
- `state.json`: step, tokens, loader position, schedule, config, the optimizer's param groups, and
  the size and xxh3 of every file above (a truncated or altered file is detected before anything is
  loaded; resume then falls back to the previous checkpoint with a note).

Crash safety: a checkpoint is written into `.tmp-step-...`, every file and the folder are fsynced,
and only then is the folder renamed to its final name (and the parent fsynced). The previous
checkpoint is deleted only after that, keeping the last `keep`, so a kill or a full disk at any
moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

import durable
from sae.base import file_digest
from train.layout import CHECKPOINT_DIR, CHECKPOINT_RE, checkpoint_name
from train.layout import CHECKPOINT_STATE_FILE as STATE_FILE
from train.layout import CHECKPOINT_TMP_PREFIX as TMP_PREFIX

FORMAT_VERSION = 1
GROUPS = ("model", "optimizer", "state")  # one safetensors file each
KEEP = 2


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message says which and what to do."""


@dataclass
class Checkpoint:
    step: int
    tensors: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # group -> name -> tensor
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-able scalars


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (temporaries are never listed)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def write_checkpoint(run_dir: str | Path, ckpt: Checkpoint, keep: int = KEEP) -> Path:
    """Write `ckpt` atomically as `checkpoints/step-<step>/`, then prune to the newest `keep`.
    On any failure the partial folder is removed and older checkpoints are untouched; an I/O error
    (a full disk, reported by the OS or by safetensors) becomes a CheckpointError saying so."""
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(ckpt.step)
    tmp = root / (TMP_PREFIX + name)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_folder(tmp, ckpt)
        final = _publish(tmp, root / name)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # never a half checkpoint for a later run to trip over
        # safetensors reports a full disk as SafetensorError, with the OS's text in its message
        if not isinstance(e, (OSError, SafetensorError)):
            raise
        previous = [p.name for p in list_checkpoints(run_dir)]
        kept = f"the previous checkpoint ({previous[-1]}) is intact" if previous else "no earlier checkpoint exists"
        what = "disk full" if durable.is_disk_full(e) else f"error ({e})"
        raise CheckpointError(
            f"{what} while writing checkpoint {name} in {root}; {kept}. Free space and rerun with --resume."
        ) from e
    _prune(root, keep)
    return final


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Load a checkpoint folder with safetensors and json only; validates sizes and format."""
    path = Path(path)
    try:
        meta = json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / STATE_FILE} cannot be read ({e}); resume from an earlier checkpoint") from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    tensors = {}
    for group in GROUPS:
        file = path / f"{group}.safetensors"
        expected = meta.get("files", {}).get(file.name)
        if not file.is_file() or file.stat().st_size != expected:
            raise CheckpointError(f"{file} is missing or truncated (expected {expected} bytes)")
        digests = meta.get("xxh3")  # checkpoints written before checksums have none
        digest = digests.get(file.name) if isinstance(digests, dict) else None
        if digest is not None and file_digest(file)["xxh3"] != digest:
            raise CheckpointError(f"{file} does not match its checksum in {STATE_FILE} (a flipped byte)")
        try:
            tensors[group] = load_file(str(file))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file} is not a valid safetensors file ({e})") from e
    return Checkpoint(step=int(meta["step"]), tensors=tensors, meta=meta)


def latest_checkpoint(run_dir: str | Path) -> Checkpoint | None:
    """The newest checkpoint that reads back completely; a damaged newer one is skipped with a note
    in the returned meta (`skipped`)."""
    skipped = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            ckpt = read_checkpoint(path)
        except CheckpointError as e:
            skipped.append(str(e))
            continue
        ckpt.meta["skipped"] = skipped
        return ckpt
    if skipped:
        raise CheckpointError("no readable checkpoint: " + "; ".join(skipped))
    return None


def _write_folder(tmp: Path, ckpt: Checkpoint) -> None:
    tmp.mkdir(parents=True)
    sizes, digests = {}, {}
    for group in GROUPS:
        file = tmp / f"{group}.safetensors"
        tensors = {k: v.detach().contiguous().cpu() for k, v in ckpt.tensors.get(group, {}).items()}
        _write_tensors(file, tensors)
        sizes[file.name] = file.stat().st_size
        digests[file.name] = file_digest(file)["xxh3"]
    meta = {**ckpt.meta, "format_version": FORMAT_VERSION, "step": ckpt.step, "files": sizes, "xxh3": digests}
    durable.write_synced(tmp / STATE_FILE, json.dumps(meta, indent=1).encode())
    durable.fsync_dir(tmp)


def _write_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    """One safetensors file, fsynced. (Tests inject ENOSPC here.)"""
    save_file(tensors, str(path))
    durable.fsync_path(path)


def _publish(tmp: Path, final: Path) -> Path:
    # A folder of the same step exists only when a finished run is resumed; move it aside first
    # so that at every moment one complete copy is on disk.
    aside = final.with_name(TMP_PREFIX + "old-" + final.name)
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(tmp, final)
    durable.fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)
    return final


def _prune(root: Path, keep: int) -> None:
    for old in list_checkpoints(root.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stray in root.glob(TMP_PREFIX + "*"):
        shutil.rmtree(stray, ignore_errors=True)
