"""Opening a folder for writing: new cache, resume, overwrite, or refuse; crash leftovers cleanup."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import durable

from . import manifest, shardio
from .checksum import shard_size
from .manifest import ManifestError
from .names import MANIFEST, SPLITS, TMP_PREFIX, is_cache_file, parse_shard_name, stat_keys
from .stats import ShardSums, SplitStats

OVERWRITE_HINT = "use --overwrite (OVERWRITE=1) to replace it"
# Fields besides `identity` that must match for a resume; the rows already written depend on them.
_MATCHING = ("layers", "d_model", "dtype", "backend", "shard_rows")


def json_roundtrip(value: dict, what: str) -> dict:
    """The value as it will read back from the manifest (tuples become lists, keys strings)."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serialisable (str/int/float/bool/None/list/dict): {exc}") from exc


def identity_diff(old: dict, new: dict) -> list[str]:
    """Human-readable differences between a cache's manifest and the requested one."""
    diffs = []
    for key in sorted(set(old["identity"]) | set(new["identity"]), key=str):
        a, b = old["identity"].get(key, "<absent>"), new["identity"].get(key, "<absent>")
        if a != b:
            diffs.append(f"identity.{key} ({a!r} in the cache, {b!r} requested)")
    for key in _MATCHING:
        if old[key] != new[key]:
            diffs.append(f"{key} ({old[key]!r} in the cache, {new[key]!r} requested)")
    return diffs


def _remove_cache_files(folder: Path) -> None:
    for entry in folder.iterdir():
        if is_cache_file(entry.name):
            durable.remove_path(entry)
    durable.fsync_dir(folder)


def _read_sums(folder: Path, entry: dict, layers: list[int], d_model: int, backend: str) -> dict[int, ShardSums]:
    shard = shardio.open_shard(folder / entry["name"], backend)
    out = {}
    for layer in layers:
        k_sum, k_sq, k_norm = stat_keys(layer)
        specs = [shard.spec(k_sum), shard.spec(k_sq), shard.spec(k_norm)]
        if specs != [(torch.float64, (d_model,)), (torch.float64, ()), (torch.float64, ())]:
            raise ValueError(f"shard {entry['name']} in {folder} lacks valid statistics for layer {layer}; "
                             f"the cache is damaged: run `python -m cache verify {folder}` or {OVERWRITE_HINT}")
        out[layer] = ShardSums(shard.get(k_sum).numpy().copy(), float(shard.get(k_sq)),
                               float(shard.get(k_norm)))
    return out


def _check_listed(folder: Path, m: dict) -> None:
    for split in SPLITS:
        for entry in m["shards"][split]:
            path = folder / entry["name"]
            size = shard_size(path) if path.exists() else None
            if size != entry["bytes"]:
                state = "is missing" if size is None else f"has {size} bytes instead of {entry['bytes']}"
                raise ValueError(f"shard {entry['name']} listed in {folder / MANIFEST} {state}; the cache "
                                 f"is damaged: run `python -m cache verify {folder}` or {OVERWRITE_HINT}")


def _remove_leftovers(folder: Path, m: dict) -> None:
    """Delete temporaries and shards renamed after the last manifest rewrite (a crash in between)."""
    for entry in folder.iterdir():
        parsed = parse_shard_name(entry.name)
        orphan = (parsed is not None and parsed[2] == m["backend"]
                  and parsed[1] >= len(m["shards"][parsed[0]]))
        if entry.name.startswith(TMP_PREFIX) or orphan:
            durable.remove_path(entry)
    durable.fsync_dir(folder)


def _resume(folder: Path, old: dict, requested: dict) -> tuple[dict, dict[str, SplitStats]]:
    _remove_leftovers(folder, old)
    _check_listed(folder, old)
    totals = {}
    for split in SPLITS:
        acc = SplitStats(old["layers"], old["d_model"])
        for entry in old["shards"][split]:
            acc.add(entry["rows"], _read_sums(folder, entry, old["layers"], old["d_model"], old["backend"]))
        old["stats"][split] = acc.to_manifest()
        totals[split] = acc
    old.update(complete=False, metadata=requested["metadata"],
               zarr_compression=requested["zarr_compression"])
    return old, totals


def open_for_writing(folder: Path, requested: dict, overwrite: bool) -> tuple[dict, dict[str, SplitStats]]:
    """Prepare `folder` and return (manifest to continue from, per-split statistics totals).

    requested: a fresh manifest (manifest.new) describing what the caller will write.
    """
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder; choose another cache path")
    folder.mkdir(parents=True, exist_ok=True)
    fresh = (requested, {s: SplitStats(requested["layers"], requested["d_model"]) for s in SPLITS})
    if not (folder / MANIFEST).exists():
        foreign = sorted(e.name for e in folder.iterdir() if not e.name.startswith(TMP_PREFIX))
        if foreign:
            raise ValueError(f"{folder} is not empty and holds no cache (no {MANIFEST}; it holds "
                             f"{', '.join(foreign[:5])}...); refusing to touch it: choose a new or empty folder")
        _remove_cache_files(folder)
    elif overwrite:
        _remove_cache_files(folder)
    else:
        try:
            old = manifest.load(folder)
        except ManifestError as exc:
            raise ValueError(f"{folder} holds a cache whose manifest is unusable ({exc}); {OVERWRITE_HINT}") from exc
        diffs = identity_diff(old, requested)
        if diffs:
            raise ValueError(f"cache at {folder} was written with different settings: {'; '.join(diffs)}; "
                             f"{OVERWRITE_HINT}, or choose another cache path")
        fresh = _resume(folder, old, requested)
    manifest.save(folder, fresh[0])
    return fresh
