"""Every decision about a cache folder, in one place: what is there (`survey`), what a writer may do
with it (`plan_write`: create, continue = resume or extend, replace, or refuse), what a distributed
harvest may do before its ranks start (`prepare_rank_write`), removing a cache (`remove_cache`, only
the files a cache owns), and opening it for writing (`open_for_writing`, used by CacheWriter: new,
resume, overwrite, or refuse; crash leftovers cleanup). Harvest is a client: it asks, then writes
through CacheWriter; it never inspects or deletes files of a cache folder itself. Merge targets (the
rank folders and the merge plan) are cache/merge.py's, on the names of cache/names.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import durable
from durable.lock import is_lock_file

from . import manifest, validity
from .checksum import shard_size
from .manifest import ManifestError
from .names import (
    DISTRIBUTED_KEY,
    MANIFEST,
    MERGE_PLAN,
    RANK_RE,
    SPLITS,
    TMP_PREFIX,
    is_cache_file,
    parse_shard_name,
)
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


def _read_sums(folder: Path, entry: dict, m: dict) -> dict[int, ShardSums]:
    """A listed shard's float64 sums, once the shard is checked against its manifest `m` (its format,
    tensors and finite statistics: cache/validity.py, checks 4-6)."""
    reader, problem = validity.open_checked(folder, entry, m)
    sums: dict[int, ShardSums] = {}
    if reader is not None:
        sums, problem = validity.read_sums(entry, reader, m)
    if problem is not None:
        raise ValueError(f"shard {entry['name']} in {folder} {problem.what}; the cache is damaged: run "
                         f"`python -m cache verify {folder}` or {OVERWRITE_HINT}")
    return sums


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
            acc.add(entry["rows"], _read_sums(folder, entry, old))
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
        foreign = sorted(e.name for e in folder.iterdir()
                         if not e.name.startswith(TMP_PREFIX) and not is_lock_file(e.name))
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


class FolderRefused(ValueError):
    """What was asked cannot be done to this folder; the message names the folder and the fix."""


@dataclass(frozen=True)
class Survey:
    """What a folder holds, measured against the cache a writer wants to write there."""

    path: Path
    manifest: dict | None = None  # the cache there (complete or not), if its manifest is usable
    damaged: str | None = None  # why a manifest that is there cannot be used
    diffs: list[str] = field(default_factory=list)  # how the cache there differs from the requested one
    ranks: dict[int, Path] = field(default_factory=dict)  # rank-<r> folders of a distributed harvest
    merge_pending: bool = False  # a merge of rank caches was started and not finished
    foreign: list[str] = field(default_factory=list)  # entries no cache owns

    @property
    def same(self) -> bool:
        """The same cache (identity and layout) is there, complete or not."""
        return self.manifest is not None and not self.diffs


def existing_manifest(path: Path) -> dict | None:
    """The validated manifest of the cache at `path` (complete or not), or None when there is none
    or it cannot be used."""
    try:
        return manifest.load(Path(path))
    except (FileNotFoundError, ManifestError, OSError, ValueError):
        return None


def survey(path: Path, requested: dict) -> Survey:
    """Look at `path` without changing it. `requested`: a manifest.new(...) describing what the
    caller would write (its identity and layout)."""
    path = Path(path)
    if not path.is_dir():
        return Survey(path, foreign=[path.name] if path.exists() else [])
    m = existing_manifest(path)
    damaged = None
    if m is None and (path / MANIFEST).exists():
        try:
            manifest.load(path)
        except (ManifestError, OSError, ValueError) as exc:
            damaged = str(exc)
    ranks = {int(mt.group(1)): e for e in path.iterdir() if (mt := RANK_RE.match(e.name)) and e.is_dir()}
    foreign = sorted(e.name for e in path.iterdir()
                     if not is_cache_file(e.name) and not is_lock_file(e.name)  # a nested folder's lock
                     and e.name != MERGE_PLAN and e not in ranks.values())
    diffs = identity_diff(m, requested) if m is not None else []
    return Survey(path, m, damaged, diffs, ranks, (path / MERGE_PLAN).is_file(), foreign)


def plan_write(s: Survey, *, overwrite: bool) -> str:
    """What one writer may do at `s.path`: "create" (nothing there, or an empty folder), "continue"
    (the same cache: resume it, or extend it when complete), "replace" (`overwrite` permits replacing
    a different or damaged cache). Raises FolderRefused, naming the reason and the fix."""
    if s.ranks or s.merge_pending:
        raise FolderRefused(f"{s.path} holds an unfinished harvest by several processes (rank-* folders); rerun it "
                            f"under torchrun with the same --nproc-per-node (make harvest NPROC=N), or choose "
                            f"another output folder")
    if s.foreign and s.manifest is None and s.damaged is None:
        raise FolderRefused(f"{s.path} is not empty and holds no cache (no {MANIFEST}; it holds "
                            f"{', '.join(s.foreign[:5])}); refusing to touch it: choose a new or empty folder")
    if s.same:
        return "continue"
    if s.manifest is None and s.damaged is None:
        return "create"
    if not overwrite:
        why = f"its manifest is unusable ({s.damaged})" if s.damaged else \
            f"it was written with different settings: {'; '.join(s.diffs)}"
        raise FolderRefused(f"the cache at {s.path} cannot be continued: {why}; {OVERWRITE_HINT}, or choose "
                            f"another output folder")
    return "replace"


def prepare_rank_write(s: Survey, *, overwrite: bool, world: int) -> str:
    """Before the ranks of a distributed harvest start (rank 0 alone): "finish-merge" (a merge was
    interrupted: complete it, cache.merge.finish_merge), "complete" (the same complete cache is there:
    nothing for ranks to add), or "ranks" (the folder is ready for rank caches: a replaced cache and
    rank folders dealt for another world size are removed, when `overwrite` permits). Raises FolderRefused."""
    if s.merge_pending:
        return "finish-merge"
    if s.same and s.manifest is not None and s.manifest["complete"]:
        return "complete"
    if s.same:
        raise FolderRefused(f"{s.path} holds an interrupted one-process harvest; resume it with one process "
                            f"(make harvest NPROC=1), or use --overwrite (OVERWRITE=1) to start again")
    if s.manifest is not None or s.damaged is not None:
        if not overwrite:
            why = f"{s.path / MANIFEST} is unreadable" if s.damaged else \
                f"the cache at {s.path} was written with different settings: {'; '.join(s.diffs)}"
            raise FolderRefused(f"{why}; {OVERWRITE_HINT}, or choose another output folder")
        remove_cache(s.path)
    if s.foreign:
        raise FolderRefused(f"{s.path} is not empty and holds no cache (it holds {', '.join(s.foreign[:5])}); "
                            f"refusing to touch it: choose a new or empty folder")
    stale = {r: f for r, f in s.ranks.items() if r >= world or _rank_world(f) not in (None, world)}
    if stale and not overwrite:
        raise FolderRefused(f"{s.path} holds an unfinished harvest by a different number of processes "
                            f"({len(s.ranks)} rank folders; this run has {world}): rerun with the same "
                            f"--nproc-per-node (NPROC), or use --overwrite (OVERWRITE=1) to start again")
    for folder in stale.values():
        durable.remove_path(folder)
    return "ranks"


def remove_cache(path: Path) -> None:
    """Delete the cache at `path`: only the files a cache owns (manifest, shards, temporaries, a merge
    plan), never anything else in the folder (FORMAT.md section 6)."""
    for entry in Path(path).iterdir():
        if is_cache_file(entry.name) or entry.name == MERGE_PLAN:
            durable.remove_path(entry)
    durable.fsync_dir(Path(path))


def _rank_world(folder: Path) -> int | None:
    """The world size a rank cache was written for (None: no usable manifest; the writer decides)."""
    m = existing_manifest(folder)
    if m is None:
        return None
    info = m["metadata"].get(DISTRIBUTED_KEY)
    return info.get("world_size") if isinstance(info, dict) else -1
