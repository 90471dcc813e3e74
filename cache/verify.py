"""verify: check a cache against everything that makes it valid (cache/validity.py, in its order) and
report what is wrong, file by file: every check a reader makes, and the ones readers leave to reads."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import manifest as manifest_mod
from . import validity
from .names import MANIFEST, SPLITS, TMP_PREFIX
from .stats import ShardSums


class NotACacheError(FileNotFoundError):
    """The path is not a folder holding a manifest.json."""


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    shards_checked: int = 0
    bytes_checked: int = 0


def _check_one(folder: Path, m: dict, split: str, entry: dict) -> tuple[dict[int, ShardSums] | None,
                                                                      validity.Problem | None]:
    return validity.shard_problem(folder, entry, split, m, checksum=True, values=True)


def verify_report(path: str | Path, workers: int | None = None) -> VerifyReport:
    """Check the manifest, then every listed shard (size, xxh3_64 streamed, tensors, statistics, finite
    values), then the manifest's statistics against the shards' sums; list problems and warnings.

    Raises NotACacheError when `path` has no manifest.json (the CLI exits 2 for that).
    """
    folder = Path(path)
    if not (folder / MANIFEST).is_file():
        raise NotACacheError(f"{folder} is not a cache: no {MANIFEST}")
    report = VerifyReport()
    try:
        m = manifest_mod.load(folder)
    except manifest_mod.ManifestError as exc:
        report.problems.append(f"manifest: {exc}")
        return report
    if not m["complete"]:
        report.warnings.append("cache is incomplete (complete=false): rerun make harvest to finish it")
    entries = [(s, e) for s in SPLITS for e in m["shards"][s]]
    known = {MANIFEST} | {e["name"] for _s, e in entries}
    for name in sorted(os.listdir(folder)):
        if name.startswith(TMP_PREFIX):
            report.warnings.append(f"{name}: temporary left by an interrupted (or running) writer; "
                                   "the next writer removes it")
        elif name not in known:
            report.warnings.append(f"{name}: unknown file, not part of the cache")
    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        results = list(pool.map(lambda se: _check_one(folder, m, *se), entries))
    report.problems.extend(p.line() for _sums, p in results if p is not None)
    if not report.problems:  # the split statistics are re-added from sums that are now known to be sound
        sums: dict[str, list[dict[int, ShardSums]]] = {s: [] for s in SPLITS}
        for (split, _e), (got, _p) in zip(entries, results, strict=True):
            assert got is not None
            sums[split].append(got)
        report.problems.extend(p.line() for p in validity.stats_problems(m, sums))
    report.shards_checked = len(entries)
    report.bytes_checked = sum(e["bytes"] for _s, e in entries)
    return report


def verify(path: str | Path) -> list[str]:
    """Problems found (empty = ok); each names the shard and what is wrong."""
    return verify_report(path).problems
