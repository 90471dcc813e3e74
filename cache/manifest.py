"""The manifest: its schema, strict validation of untrusted JSON, and atomic rewrite.

The manifest is a JSON object; FORMAT.md lists every key. Validation names the offending key so a
damaged or hand-edited manifest gives an error that says what to fix.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import durable

from .encoding import ENCODED_DTYPES
from .names import (
    BACKENDS,
    FORMAT_VERSION,
    MANIFEST,
    READABLE_FORMAT_VERSIONS,
    SPLITS,
    STORED_DTYPES,
    format_version_for,
    shard_name,
)

_HEX16 = re.compile(r"^[0-9a-f]{16}$")
MAX_MANIFEST_BYTES = 1 << 30


class ManifestError(ValueError):
    """The manifest is missing, unreadable or does not follow the schema."""


def _fail(where: str, key: str, msg: str) -> ManifestError:
    return ManifestError(f"{where}: {key} {msg}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _get(obj: dict, key: str, kind: type | tuple, where: str, path: str = "") -> Any:
    full = f"{path}{key}"
    if key not in obj:
        raise _fail(where, f"key '{full}'", "is missing")
    value = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = any(_is_int(value) if k is int else isinstance(value, k) for k in kinds)
    if not ok:
        names = "/".join(k.__name__ for k in kinds)
        raise _fail(where, f"key '{full}'", f"must be {names}, got {type(value).__name__}")
    return value


def _check_version(obj: dict, where: str) -> None:
    version = _get(obj, "format_version", int, where)
    if version > FORMAT_VERSION:
        raise ManifestError(
            f"{where}: format_version {version} is newer than this reader understands "
            f"({FORMAT_VERSION}); upgrade the package to read this cache"
        )
    if version not in READABLE_FORMAT_VERSIONS:
        raise ManifestError(f"{where}: unsupported format_version {version} (expected one of "
                            f"{list(READABLE_FORMAT_VERSIONS)})")


def _check_header(obj: dict, where: str) -> None:
    _get(obj, "complete", bool, where)
    _get(obj, "identity", dict, where)
    _get(obj, "metadata", dict, where)
    layers = _get(obj, "layers", list, where)
    if not layers or not all(_is_int(x) and x >= 0 for x in layers) or len(set(layers)) != len(layers):
        raise _fail(where, "key 'layers'", f"must be a non-empty list of distinct ints >= 0, got {layers!r}")
    if _get(obj, "d_model", int, where) < 1:
        raise _fail(where, "key 'd_model'", "must be >= 1")
    # The 8-bit dtypes came with format_version 2; a version-1 manifest naming one is damaged.
    dtypes = sorted(STORED_DTYPES) + (list(ENCODED_DTYPES) if obj["format_version"] >= 2 else [])
    if _get(obj, "dtype", str, where) not in dtypes:
        raise _fail(where, "key 'dtype'", f"must be one of {dtypes} in format_version {obj['format_version']}, "
                                          f"got {obj['dtype']!r}")
    if _get(obj, "backend", str, where) not in BACKENDS:
        raise _fail(where, "key 'backend'", f"must be one of {list(BACKENDS)}, got {obj['backend']!r}")
    if _get(obj, "shard_rows", int, where) < 1:
        raise _fail(where, "key 'shard_rows'", "must be >= 1")
    if obj.get("zarr_compression") is not None:
        _get(obj, "zarr_compression", str, where)


def _check_shard(entry: Any, split: str, index: int, backend: str, where: str) -> int:
    path = f"shards.{split}[{index}]."
    if not isinstance(entry, dict):
        raise _fail(where, f"key 'shards.{split}[{index}]'", "must be an object")
    expected = shard_name(split, index, backend)
    if _get(entry, "name", str, where, path) != expected:
        raise _fail(where, f"key '{path}name'", f"must be {expected!r}, got {entry['name']!r}")
    rows = _get(entry, "rows", int, where, path)
    if rows < 1:
        raise _fail(where, f"key '{path}rows'", "must be >= 1")
    if _get(entry, "bytes", int, where, path) < 0:
        raise _fail(where, f"key '{path}bytes'", "must be >= 0")
    if not _HEX16.match(_get(entry, "xxh3", str, where, path)):
        raise _fail(where, f"key '{path}xxh3'", "must be 16 lowercase hex digits")
    end = _get(entry, "end", list, where, path)
    if len(end) != 2 or not all(_is_int(x) and x >= 0 for x in end):
        raise _fail(where, f"key '{path}end'", f"must be [chunk, offset] of two ints >= 0, got {end!r}")
    return rows


def _check_stats(entry: Any, split: str, layer: int, rows: int, d_model: int, where: str) -> None:
    path = f"stats.{split}.{layer}."
    if not isinstance(entry, dict):
        raise _fail(where, f"key 'stats.{split}.{layer}'", "must be an object")
    if _get(entry, "count", int, where, path) != rows:
        raise _fail(where, f"key '{path}count'", f"is {entry['count']} but the split has {rows} rows")
    empty = rows == 0
    for key in ("mean_sq_norm", "mean_norm"):
        value = entry.get(key)
        if (value is not None or not empty) and not _is_num(value):
            raise _fail(where, f"key '{path}{key}'", f"must be a finite number, got {value!r}")
    mean = entry.get("mean")
    if empty and mean is None:
        return
    if not isinstance(mean, list) or len(mean) != d_model or not all(_is_num(v) for v in mean):
        raise _fail(where, f"key '{path}mean'", f"must be a list of {d_model} finite numbers")


def _check_splits(obj: dict, where: str) -> None:
    rows = _get(obj, "rows", dict, where)
    shards = _get(obj, "shards", dict, where)
    stats = _get(obj, "stats", dict, where)
    for split in SPLITS:
        n = _get(rows, split, int, where, "rows.")
        entries = _get(shards, split, list, where, "shards.")
        total = sum(_check_shard(e, split, i, obj["backend"], where) for i, e in enumerate(entries))
        if total != n:
            raise _fail(where, f"key 'rows.{split}'", f"is {n} but its shards hold {total} rows")
        per_layer = _get(stats, split, dict, where, "stats.")
        for layer in obj["layers"]:
            if str(layer) not in per_layer:
                raise _fail(where, f"key 'stats.{split}.{layer}'", "is missing")
            _check_stats(per_layer[str(layer)], split, layer, n, obj["d_model"], where)


def validate(obj: Any, where: str) -> dict:
    """Check a parsed manifest against the schema; return it, or raise ManifestError naming the key.

    Keys this version does not know are ignored (the format_version matched).
    """
    if not isinstance(obj, dict):
        raise ManifestError(f"{where}: the manifest must be a JSON object, got {type(obj).__name__}")
    _check_version(obj, where)
    _check_header(obj, where)
    _check_splits(obj, where)
    return obj


def load(folder: Path) -> dict:
    """Read and validate `folder/manifest.json`. FileNotFoundError when there is none."""
    path = folder / MANIFEST
    where = str(path)
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{where}: {size} bytes is too large to be a manifest")
    try:
        obj = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{where}: not valid JSON ({exc}); the file is damaged") from exc
    return validate(obj, where)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def save(folder: Path, manifest: dict, encoder: ManifestText | None = None) -> None:
    """Atomically replace the manifest (temp file, fsync, rename, fsync folder).

    Compact JSON: it is rewritten as shards are committed, and only the compact form uses the C
    encoder (the indented one is pure Python and holds the interpreter lock ~3x longer). A writer
    passes its ManifestText so that only what changed since its last rewrite is encoded again."""
    data = encoder.encode(manifest) if encoder is not None else _dumps(manifest).encode()
    durable.atomic_write_bytes(folder / MANIFEST, data)


class ManifestText:
    """Encodes one writer's successive manifests to the same bytes as compact json.dumps, re-encoding
    only what changed: shard entries are only ever appended (and never modified), and a split's
    statistics are replaced by a new object when they change. Without this, a long harvest of a wide
    model would spend tens of milliseconds of interpreter lock per commit on unchanged numbers."""

    def __init__(self) -> None:
        self._entries: dict[str, list[tuple[dict, str]]] = {}
        self._stats: dict[str, tuple[dict, str]] = {}

    def _shards(self, split: str, entries: list[dict]) -> str:
        done = self._entries.get(split, [])
        if len(done) > len(entries) or (done and entries[len(done) - 1] is not done[-1][0]):
            done = []  # not a continuation of what was encoded: start again
        done = done + [(e, _dumps(e)) for e in entries[len(done):]]
        self._entries[split] = done
        return "[" + ",".join(text for _, text in done) + "]"

    def _split_stats(self, split: str, stats: dict) -> str:
        cached = self._stats.get(split)
        if cached is None or cached[0] is not stats:
            cached = self._stats[split] = (stats, _dumps(stats))
        return cached[1]

    def encode(self, manifest: dict) -> bytes:
        parts = []
        for key, value in manifest.items():
            if key == "shards":
                text = "{" + ",".join(f"{_dumps(s)}:{self._shards(s, v)}" for s, v in value.items()) + "}"
            elif key == "stats":
                text = "{" + ",".join(f"{_dumps(s)}:{self._split_stats(s, v)}" for s, v in value.items()) + "}"
            else:
                text = _dumps(value)
            parts.append(f"{_dumps(key)}:{text}")
        return ("{" + ",".join(parts) + "}").encode()


def new(*, identity: dict, metadata: dict, layers: list[int], d_model: int, dtype: str, backend: str,
        shard_rows: int, zarr_compression: str | None) -> dict:
    """A manifest for an empty, incomplete cache."""
    return {
        "format_version": format_version_for(dtype),
        "complete": False,
        "identity": identity,
        "metadata": metadata,
        "layers": list(layers),
        "d_model": d_model,
        "dtype": dtype,
        "backend": backend,
        "shard_rows": shard_rows,
        "zarr_compression": zarr_compression,
        "rows": {s: 0 for s in SPLITS},
        "shards": {s: [] for s in SPLITS},
        "stats": {s: {str(L): {"count": 0, "mean": None, "mean_sq_norm": None, "mean_norm": None}
                      for L in layers} for s in SPLITS},
    }
