"""Merging the per-rank caches of a distributed harvest into one cache (FORMAT.md section 7).

Rank r of W writes a normal cache in `<cache>/rank-<r>/`. When every rank is complete, `merge_ranks`
turns them into one cache at `<cache>/` in three steps, each safe to interrupt:
1. the plan: the merged manifest (final shard names, checksums, statistics re-added exactly from the
   per-shard float64 sums in the final order) and the list of renames, written atomically to
   `<cache>/merge-plan.json`;
2. the renames `rank-<r>/<split>-<i>` -> `<split>-<j>` (shards are moved, never rewritten), then the
   merged manifest, written atomically;
3. the rank folders are removed, then the plan.
Before the plan exists the rank caches are untouched; once it exists `finish_merge` redoes steps 2
and 3 from it (a rename already made is skipped), so a rerun after a crash at any point completes
the same merged cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import durable

from . import manifest
from .checksum import shard_size
from .folder import _read_sums, identity_diff
from .manifest import ManifestError
from .names import (
    MANIFEST,
    MERGE_PLAN,
    RANK_RE,
    SPLITS,
    parse_shard_name,
    rank_folder_name,
    shard_name,
)
from .stats import SplitStats


class MergeError(ValueError):
    """The rank caches cannot be merged (incomplete, different settings, a damaged plan)."""


def rank_folder(out: Path, rank: int) -> Path:
    return Path(out) / rank_folder_name(rank)


def rank_folders(out: Path) -> dict[int, Path]:
    """The `rank-<r>` folders under `out`, by rank."""
    out = Path(out)
    if not out.is_dir():
        return {}
    found = {}
    for entry in out.iterdir():
        m = RANK_RE.match(entry.name)
        if m and entry.is_dir():
            found[int(m.group(1))] = entry
    return found


def merge_pending(out: Path) -> bool:
    """True when a merge was started (its plan written) but not finished."""
    return (Path(out) / MERGE_PLAN).is_file()


def _load_ranks(out: Path, world: int) -> list[dict]:
    folders = rank_folders(out)
    extra = sorted(r for r in folders if r >= world)
    if extra:
        raise MergeError(f"{out} holds rank folders {extra} beyond world size {world}: the harvest was started "
                         f"with more processes; rerun with that many, or use --overwrite")
    loaded: list[dict] = []
    for r in range(world):
        folder = rank_folder(out, r)
        try:
            m = manifest.load(folder)
        except (FileNotFoundError, ManifestError) as exc:
            raise MergeError(f"rank {r}: no usable cache in {folder} ({exc}); rerun the harvest to redo it") from exc
        if not m["complete"]:
            raise MergeError(f"rank {r}: the cache in {folder} is incomplete; rerun the harvest to finish it")
        if loaded:
            diffs = identity_diff(loaded[0], m)
            if diffs:
                raise MergeError(f"rank {r}: the cache in {folder} differs from rank 0's: {'; '.join(diffs)}")
        loaded.append(m)
    return loaded


def plan_merge(out: Path, world: int, metadata: dict) -> dict:
    """The merge plan of the complete caches in rank-0..rank-(world-1): {"moves": [[src, dst], ...],
    "manifest": merged manifest (complete, `metadata` as its metadata)}. Shards are ordered rank by
    rank, each rank's in its own order. Reads only the per-shard sums, never the activations."""
    ranks = _load_ranks(Path(out), world)
    first = ranks[0]
    merged = manifest.new(identity=first["identity"], metadata=metadata, layers=first["layers"],
                          d_model=first["d_model"], dtype=first["dtype"], backend=first["backend"],
                          shard_rows=first["shard_rows"], zarr_compression=first.get("zarr_compression"))
    moves = []
    for split in SPLITS:
        totals = SplitStats(first["layers"], first["d_model"])
        for r, m in enumerate(ranks):
            folder = rank_folder(out, r)
            for entry in m["shards"][split]:
                dst = shard_name(split, len(merged["shards"][split]), first["backend"])
                totals.add(entry["rows"], _read_sums(folder, entry, m))
                merged["shards"][split].append({**entry, "name": dst})
                moves.append([f"{folder.name}/{entry['name']}", dst])
        merged["rows"][split] = totals.count
        merged["stats"][split] = totals.to_manifest()
    merged["complete"] = True
    return {"moves": moves, "manifest": manifest.validate(merged, "merged manifest")}


def merge_ranks(out: Path, world: int, metadata: dict) -> dict:
    """Merge the complete rank caches under `out` into one cache at `out`; returns its manifest."""
    out = Path(out)
    if (out / MANIFEST).exists():
        raise MergeError(f"{out} already holds a {MANIFEST}; refusing to merge rank caches over it")
    plan = plan_merge(out, world, metadata)
    durable.atomic_write_bytes(out / MERGE_PLAN, durable.json_text(plan).encode())
    return finish_merge(out)


def _load_plan(out: Path) -> tuple[list[tuple[str, str]], dict]:
    where = out / MERGE_PLAN
    try:
        plan = json.loads(where.read_bytes())
        merged = manifest.validate(plan["manifest"], f"{where} (manifest)")
        moves = [(str(a), str(b)) for a, b in plan["moves"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MergeError(f"{where} is unreadable ({exc}); delete {out} and harvest again") from exc
    listed = [e["name"] for s in SPLITS for e in merged["shards"][s]]
    for src, dst in moves:
        rank, _, name = src.partition("/")
        if not (RANK_RE.match(rank) and parse_shard_name(name) and parse_shard_name(dst)):
            raise MergeError(f"{where} names an unexpected move {src!r} -> {dst!r}; the plan is damaged")
    if sorted(dst for _, dst in moves) != sorted(listed):
        raise MergeError(f"{where}: its moves do not match its manifest's shards; the plan is damaged")
    return moves, merged


def finish_merge(out: Path) -> dict:
    """Carry out (or complete, after a crash) the merge whose plan is in `out`; returns the manifest."""
    out = Path(out)
    moves, merged = _load_plan(out)
    touched = set()
    for src, dst in moves:
        if (out / src).exists():
            if (out / dst).exists():
                raise MergeError(f"merging {out}: both {src} and {dst} exist; the folder was changed during the "
                                 f"merge: delete {out} and harvest again")
            os.replace(out / src, out / dst)
            touched.add((out / src).parent)
        elif not (out / dst).exists():
            raise MergeError(f"merging {out}: shard {src} is gone and {dst} is not there; the rank caches were "
                             f"changed during the merge: delete {out} and harvest again")
    for folder in sorted(touched) + [out]:
        durable.fsync_dir(folder)
    for split in SPLITS:
        for entry in merged["shards"][split]:
            if shard_size(out / entry["name"]) != entry["bytes"]:
                raise MergeError(f"merging {out}: shard {entry['name']} does not have its {entry['bytes']} bytes")
    manifest.save(out, merged)
    for folder in rank_folders(out).values():
        durable.remove_path(folder)
    durable.fsync_dir(out)
    (out / MERGE_PLAN).unlink(missing_ok=True)
    durable.fsync_dir(out)
    return merged

