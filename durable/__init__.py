"""Crash-safe file primitives, the one place every package writes durably through.

Full writes, fsync of files and folders, atomic replace, cleanup. The cache's shards and manifest,
a saved SAE, training checkpoints and summaries, eval.json, the resolved config.yaml: each is
written under a temporary name, fsynced, renamed over its target and the folder fsynced, so a crash
leaves either the old or the new content, never half a file. A failing write surfaces as the
OSError of the real system call (tests inject ENOSPC there).

This package imports nothing of ours, so that every other one (`sae` and `cache` included) may use it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"


def write_all(fd: int, data: memoryview | bytes) -> None:
    """Write every byte of `data` to `fd` (os.write may write only part of a large buffer)."""
    view = memoryview(data).cast("B")
    while len(view):
        written = os.write(fd, view)
        view = view[written:]


def fsync_path(path: Path) -> None:
    """fsync a file's bytes or a folder's entries (a rename or unlink inside it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


fsync_dir = fsync_path  # the name the cache's callers read best with


def fsync_tree(path: Path) -> None:
    """fsync every file and folder below `path`, leaves first."""
    for root, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))


def remove_path(path: Path) -> None:
    """Remove a file or folder if it exists; never follows a symlinked folder."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def write_synced(path: Path, data: bytes) -> None:
    """Write `data` to `path` (created or truncated) and fsync it; no rename (see atomic_write_bytes)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path) -> None:
    """Make a finished temporary file durable under its final name: fsync it, rename it over
    `final`, fsync the folder. For files written by a library (safetensors, matplotlib)."""
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_dir(Path(final).parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new content.

    Temp file, fsync, rename over the target, fsync the folder. On error the temp file is removed
    and the old file is untouched.
    """
    path = Path(path)
    tmp = path.with_name(TMP_PREFIX + path.name)
    try:
        write_synced(tmp, data)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, doc: Any, *, indent: int | None = 2) -> None:
    """`atomic_write_bytes` of a JSON document; arrays with `tolist()` (tensors, numpy) become lists.
    The document is serialised before anything is written, so a value JSON cannot hold fails cleanly."""
    atomic_write_text(path, json.dumps(doc, indent=indent, default=_json_default))


def _json_default(value: object) -> object:
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# Libraries that do their own I/O (safetensors' Rust writer raises SafetensorError, not OSError) keep the
# OS's text in their message: "No space left on device (os error 28)".
_FULL_TEXTS = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122")


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) says the disk or the quota is full."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            return True
        if any(t in str(exc).lower() for t in _FULL_TEXTS):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        seen += 1
    return False


def write_via(final: Path, write: Callable[[Path], object]) -> Path:
    """Let a library write a file (`write(tmp)`: safetensors, matplotlib), then publish it as `final`.
    On any failure the temporary is removed and `final` is untouched; a full disk, however the library
    reports it, becomes OSError(ENOSPC) naming `final`."""
    final = Path(final)
    tmp = final.with_name(TMP_PREFIX + final.name)
    try:
        write(tmp)
        publish(tmp, final)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e) and not (isinstance(e, OSError) and e.errno in _FULL_ERRNOS):
            raise OSError(errno.ENOSPC, f"disk full while writing {final} ({e})") from e
        raise
    return final


def describe_os_error(exc: OSError, what: str) -> OSError:
    """An OSError with the same errno and a message that says what failed and how to recover."""
    if exc.errno == errno.ENOSPC:
        msg = f"disk full while writing {what}; free space and rerun to resume"
    else:
        msg = f"could not write {what}: {exc.strerror or exc}; fix the cause and rerun to resume"
    return OSError(exc.errno, msg)
