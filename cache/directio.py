"""Writing a new file's bytes straight to the disk (O_DIRECT), hashing them on the way.

A shard is written once and not read again by the harvest, so passing it through the page cache only
costs CPU (copying into the cache, reclaiming it, the kernel's writeback) and, with several shards in
flight, dirty-page throttling. With O_DIRECT the bytes are copied once into a page-aligned bounce
buffer (where they are also hashed, while in the CPU cache) and the disk reads them from there. The
file's last block is padded for the write and the file truncated to its exact size before the fsync.

Filesystems without O_DIRECT (tmpfs, some network and copy-on-write filesystems) refuse it with EINVAL,
at open or at the first write: the file is then written through the page cache instead. Set the
environment variable SAECACHE_DIRECT_IO=0 to always use the page cache.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import xxhash

import durable

BLOCK = 4096  # alignment of O_DIRECT buffers, lengths and offsets (covers 512-byte and 4 KiB devices)
# Bytes per write. 2 MiB: the bounce buffer's copy and hash then stay in a core's L2 cache, and the
# workers' writes interleave finely; the 1-layer synthetic harvest took 0.42 s against 0.51 s with 8 MiB
# (3 workers, median of 4; bench/RESULTS.md "Cache writer", run 9).
CHUNK = 2 << 20
ENABLED = os.environ.get("SAECACHE_DIRECT_IO", "1") != "0"
_local = threading.local()


def _bounce(size: int) -> np.ndarray:
    """This thread's page-aligned bounce buffer of `size` bytes (an anonymous map is page-aligned)."""
    buf = getattr(_local, "buf", None)
    if buf is None or len(buf) < size:
        _local.map = mmap.mmap(-1, size)
        buf = _local.buf = np.frombuffer(_local.map, dtype=np.uint8)
    return buf[:size]


def _direct(path: Path, parts: list[memoryview]) -> tuple[int, str]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o644)
    h = xxhash.xxh3_64()
    chunk = CHUNK
    buf, fill, size = _bounce(chunk), 0, 0
    try:
        for part in parts:
            src = np.frombuffer(part, dtype=np.uint8)
            pos = 0
            while pos < len(src):
                n = min(chunk - fill, len(src) - pos)
                buf[fill:fill + n] = src[pos:pos + n]  # numpy copies without holding the GIL
                fill, pos = fill + n, pos + n
                if fill == chunk:
                    h.update(buf.data)
                    durable.write_all(fd, buf.data)
                    size, fill = size + chunk, 0
        if fill:
            h.update(buf[:fill].data)
            padded = -(-fill // BLOCK) * BLOCK
            buf[fill:padded] = 0
            durable.write_all(fd, buf[:padded].data)
            size += fill
            os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
    return size, h.hexdigest()


def _buffered(path: Path, parts: list[memoryview]) -> tuple[int, str]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    h = xxhash.xxh3_64()
    size = 0
    try:
        for part in parts:
            h.update(part)
            durable.write_all(fd, part)
            size += len(part)
        os.fsync(fd)
    finally:
        os.close(fd)
    return size, h.hexdigest()


def write_new_file(path: Path, parts: Iterable[memoryview]) -> tuple[int, str]:
    """Create `path` (must not exist) holding the concatenation of `parts` (byte views), fsync it, and
    return (size, xxh3_64 hex of the bytes). On an error the partial file is left for the caller."""
    parts = [memoryview(p).cast("B") for p in parts]
    if ENABLED and hasattr(os, "O_DIRECT"):
        try:
            return _direct(path, parts)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            Path(path).unlink(missing_ok=True)  # the filesystem refused O_DIRECT: write it buffered
    return _buffered(path, parts)
