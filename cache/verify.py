"""verify: re-hash every shard against the manifest and report what is wrong, shard by shard."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import manifest as manifest_mod
from .checksum import hash_shard, shard_size
from .names import MANIFEST, SPLITS, TMP_PREFIX


class NotACacheError(FileNotFoundError):
    """The path is not a folder holding a manifest.json."""


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    shards_checked: int = 0
    bytes_checked: int = 0


def _check_one(folder: Path, entry: dict) -> str | None:
    path = folder / entry["name"]
    if not path.exists():
        return f"shard {entry['name']}: missing"
    size = shard_size(path)
    if size != entry["bytes"]:
        return f"shard {entry['name']}: {size} bytes but the manifest says {entry['bytes']} (truncated or altered)"
    _size, digest = hash_shard(path)
    if digest != entry["xxh3"]:
        return f"shard {entry['name']}: checksum mismatch (xxh3 {digest}, manifest says {entry['xxh3']}): corrupted"
    return None


def verify_report(path: str | Path, workers: int | None = None) -> VerifyReport:
    """Hash every listed shard (xxh3_64, streamed) and list problems and warnings.

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
    entries = [e for s in SPLITS for e in m["shards"][s]]
    known = {MANIFEST} | {e["name"] for e in entries}
    for name in sorted(os.listdir(folder)):
        if name.startswith(TMP_PREFIX):
            report.warnings.append(f"{name}: temporary left by an interrupted (or running) writer; "
                                   "the next writer removes it")
        elif name not in known:
            report.warnings.append(f"{name}: unknown file, not part of the cache")
    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        results = list(pool.map(lambda e: _check_one(folder, e), entries))
    report.problems.extend(r for r in results if r is not None)
    report.shards_checked = len(entries)
    report.bytes_checked = sum(e["bytes"] for e in entries)
    return report


def verify(path: str | Path) -> list[str]:
    """Problems found (empty = ok); each names the shard and what is wrong."""
    return verify_report(path).problems
