"""xxh3_64 checksums of shards, streamed in large blocks (corruption detection, not security).

A safetensors shard hashes its file's bytes. A zarr shard (a folder) hashes, for every file in
sorted relative-path order: the path (UTF-8, '/' separators), a NUL byte, the file size as u64
little-endian, then the file's bytes. FORMAT.md states the same rule.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import xxhash

_BLOCK = 8 << 20


def _feed_file(h: xxhash.xxh3_64, path: Path, buf: bytearray) -> int:
    view = memoryview(buf)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(view)
            if not n:
                return total
            h.update(view[:n])
            total += n


def tree_files(folder: Path) -> list[tuple[str, Path]]:
    """(relative posix path, path) of every regular file below `folder`, sorted by relative path."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in files:
            path = Path(root) / name
            out.append((path.relative_to(folder).as_posix(), path))
    return sorted(out)


def hash_file(path: Path) -> tuple[int, str]:
    """(size in bytes, xxh3_64 hex) of one file's content."""
    h = xxhash.xxh3_64()
    size = _feed_file(h, path, bytearray(_BLOCK))
    return size, h.hexdigest()


def hash_tree(folder: Path) -> tuple[int, str]:
    """(total bytes of all files, xxh3_64 hex) of a folder under the path-framed rule above."""
    h = xxhash.xxh3_64()
    buf = bytearray(_BLOCK)
    total = 0
    for rel, path in tree_files(folder):
        h.update(rel.encode("utf-8") + b"\0" + struct.pack("<Q", path.stat().st_size))
        total += _feed_file(h, path, buf)
    return total, h.hexdigest()


def hash_shard(path: Path) -> tuple[int, str]:
    """(bytes, xxh3 hex) of a shard: a file (safetensors) or a folder (zarr)."""
    return hash_tree(path) if path.is_dir() else hash_file(path)


def shard_size(path: Path) -> int:
    """Bytes of a shard without reading it (sum of file sizes for a folder)."""
    if path.is_dir():
        return sum(p.stat().st_size for _rel, p in tree_files(path))
    return path.stat().st_size
