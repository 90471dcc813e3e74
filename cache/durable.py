"""Crash-safe file primitives: full writes, fsync of files and folders, atomic replace, cleanup.

The safetensors shards and the manifest are written through `write_all` (zarr shards through
zarr's own store), so a failing write surfaces as the OSError of the real system call.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path


def write_all(fd: int, data: memoryview | bytes) -> None:
    """Write every byte of `data` to `fd` (os.write may write only part of a large buffer)."""
    view = memoryview(data).cast("B")
    while len(view):
        written = os.write(fd, view)
        view = view[written:]


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file and folder below `path`, leaves first."""
    for root, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def remove_path(path: Path) -> None:
    """Remove a file or folder if it exists; never follows a symlinked folder."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new content.

    Temp file, fsync, rename over the target, fsync the folder. On error the temp file is removed
    and the old file is untouched.
    """
    tmp = path.with_name(".tmp-" + path.name)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def describe_os_error(exc: OSError, what: str) -> OSError:
    """An OSError with the same errno and a message that says what failed and how to recover."""
    if exc.errno == errno.ENOSPC:
        msg = f"disk full while writing {what}; free space and rerun to resume"
    else:
        msg = f"could not write {what}: {exc.strerror or exc}; fix the cause and rerun to resume"
    return OSError(exc.errno, msg)
