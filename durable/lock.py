"""Inter-process locks on the folders the project writes (a cache, a run folder).

One writer at a time, or any number of readers: a writer takes `exclusive(folder)`, a reader (a
training reading its cache) `shared(folder)`. The lock is the OS's `flock` on `.<name>.saecache-lock`
beside the folder (in its parent: the folder itself is never touched, so a foreign folder stays as it
is and replacing a folder's content never deletes its lock), so it is released by the kernel when its
process ends in any way (kill -9 included): a lock left by a dead process is simply free, and the next
process takes it over (with a note naming the previous holder). Beside the OS lock, each holder writes
a JSON record (pid, host, start time, command) so that a refusal can name who holds the folder: the
writer's record is the lock file's content, each reader's a `.<name>.saecache-lock.reader-<host>-<pid>`
file beside it.

The lock file is never deleted (deleting it while held would let a second process lock a new file of
the same name).

Filesystems: flock is coherent between processes of one host on every local filesystem, and between
hosts on NFSv4 (Linux maps flock to NFS byte-range locks) and on Lustre mounted with `-o flock`.
Where flock is refused (ENOLCK, ENOSYS, EOPNOTSUPP: Lustre `noflock`, some FUSE filesystems) the
record alone is used: a holder on this host whose pid is gone is taken over; one on another host is
refused, naming the record to delete once that process is known to be gone. On `localflock` Lustre or
NFSv3 without lockd, locks do not reach other hosts: run every writer of one folder on one host.

Locks are per process and re-entrant: a process that holds a folder may take it again (a harvest
holds its cache and its writer takes it too), and the folder is released when the last one is.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOCK_SUFFIX = ".saecache-lock"
READER_TAG = ".reader-"
_UNSUPPORTED = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


class LockHeld(RuntimeError):
    """Another process holds the folder; the message names the folder and the holder(s)."""


def lock_path(folder: str | Path) -> Path:
    """The lock file of `folder`: `.<name>.saecache-lock` in its parent."""
    real = Path(os.path.realpath(folder))
    return real.parent / f".{real.name}{LOCK_SUFFIX}"


def is_lock_file(name: str) -> bool:
    """True for lock files and reader records."""
    return name.startswith(".") and (name.endswith(LOCK_SUFFIX) or f"{LOCK_SUFFIX}{READER_TAG}" in name)


def _reader_prefix(folder: Path) -> str:
    return lock_path(folder).name + READER_TAG


def this_holder(mode: str) -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "mode": mode,
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "command": " ".join(sys.argv)[:300] or sys.executable}


def describe(record: dict[str, Any]) -> str:
    return (f"pid {record.get('pid')} on {record.get('host')} since {record.get('started')} "
            f"(command: {record.get('command')})")


def pid_alive(pid: Any) -> bool:
    """Whether process `pid` runs on this host (a pid we may not signal is alive)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class FolderLock:
    """A held lock; `release()` (or leaving the `with` block) gives it back."""

    folder: Path
    mode: str  # "exclusive" or "shared"
    fd: int | None  # None: a read-only folder without a lock file (nothing to lock)
    reader_record: Path | None = None
    notes: list[str] = field(default_factory=list)  # e.g. the dead holder taken over
    count: int = 1

    def release(self) -> None:
        self.count -= 1
        if self.count > 0:
            return
        _HELD.pop(_key(self.folder), None)
        if self.reader_record is not None:
            try:
                os.unlink(self.reader_record)
            except OSError:
                pass
        if self.fd is not None:
            try:
                if self.mode == "exclusive":
                    os.ftruncate(self.fd, 0)  # an empty record: nobody holds it
            except OSError:
                pass
            finally:
                os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


_HELD: dict[str, FolderLock] = {}


def _key(folder: Path) -> str:
    return os.path.realpath(folder)


def exclusive(folder: str | Path, what: str = "folder") -> FolderLock:
    """Hold `folder` for writing, or raise LockHeld naming the holder(s); the folder itself need not
    exist (its parent is created for the lock file). `what` names the folder's kind in messages
    ("cache", "run folder")."""
    folder = Path(folder)
    held = _HELD.get(_key(folder))
    if held is not None:
        if held.mode != "exclusive":
            raise LockHeld(f"{what} {folder} is held for reading by this process; it cannot also write it")
        held.count += 1
        return held
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        notes = _take(fd, path, folder, what, fcntl.LOCK_EX)
        _write_record(fd, this_holder("exclusive"))
    except BaseException:
        os.close(fd)
        raise
    lock = FolderLock(folder, "exclusive", fd, notes=notes)
    _HELD[_key(folder)] = lock
    return lock


def shared(folder: str | Path, what: str = "folder") -> FolderLock:
    """Hold `folder` for reading (any number of readers, no writer), or raise LockHeld naming the
    writer. A folder whose parent this process cannot write and that has no lock file yet is read
    unlocked (`fd` is None then; the manifest check of a training still catches a change)."""
    folder = Path(folder)
    held = _HELD.get(_key(folder))
    if held is not None:
        held.count += 1
        return held
    path = lock_path(folder)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # flock works on a read-only descriptor
        except (FileNotFoundError, PermissionError):
            lock = FolderLock(folder, "shared", None)
            _HELD[_key(folder)] = lock
            return lock
    try:
        notes = _take(fd, path, folder, what, fcntl.LOCK_SH)
    except BaseException:
        os.close(fd)
        raise
    record: Path | None = path.parent / f"{_reader_prefix(folder)}{socket.gethostname()}-{os.getpid()}"
    try:
        record.write_text(json.dumps(this_holder("shared")))  # type: ignore[union-attr]
    except OSError:
        record = None  # a read-only parent: a refusal can then say "a reader" only
    lock = FolderLock(folder, "shared", fd, reader_record=record, notes=notes)
    _HELD[_key(folder)] = lock
    return lock


def holders(folder: str | Path) -> list[dict[str, Any]]:
    """The records of whoever holds `folder` now (the writer's, or the live readers')."""
    folder = Path(folder)
    out = []
    record = _read_record_at(lock_path(folder))
    if record and (record.get("host") != socket.gethostname() or pid_alive(record.get("pid"))):
        out.append(record)
    path = lock_path(folder)
    for entry in sorted(path.parent.glob(_reader_prefix(folder) + "*")):
        r = _read_record_at(entry)
        if r and (r.get("host") != socket.gethostname() or pid_alive(r.get("pid"))):
            out.append(r)
    return out


def _take(fd: int, path: Path, folder: Path, what: str, op: int) -> list[str]:
    """flock `fd` without waiting; on refusal raise LockHeld naming the holders. Returns notes."""
    try:
        fcntl.flock(fd, op | fcntl.LOCK_NB)
    except BlockingIOError:
        raise LockHeld(_refusal(folder, what, op)) from None
    except OSError as e:
        if e.errno not in _UNSUPPORTED:
            raise
        return _take_by_record(fd, path, folder, what, op)
    _drop_dead_readers(folder, everyone=op == fcntl.LOCK_EX)
    previous = _read_record(fd)
    if previous and op == fcntl.LOCK_SH:
        try:  # a reader holds it, so no writer does: the record is a killed writer's
            os.ftruncate(fd, 0)
        except OSError:
            pass
        return []
    if previous and op == fcntl.LOCK_EX and previous.get("mode") == "exclusive":
        return [f"took over the lock on {what} {folder} left by {describe(previous)}, which no longer runs"]
    return []


def _take_by_record(fd: int, path: Path, folder: Path, what: str, op: int) -> list[str]:
    """No flock on this filesystem: the holder record decides (same host: is its pid alive?)."""
    previous = _read_record(fd)
    if not previous or previous.get("pid") == os.getpid():
        return [f"{folder}'s filesystem refuses flock: locking by holder record only (cache/FORMAT.md)"]
    if previous.get("host") == socket.gethostname():
        if pid_alive(previous.get("pid")):
            raise LockHeld(_refusal(folder, what, op))
        return [f"took over the lock on {what} {folder} left by {describe(previous)}, which no longer runs"]
    raise LockHeld(f"{what} {folder} is held by {describe(previous)} (another host; this filesystem has no "
                   f"flock, so its liveness cannot be checked): if that process is gone, delete {path} and rerun")


def _drop_dead_readers(folder: Path, everyone: bool) -> None:
    """Remove reader records left by killed readers: all of them once the exclusive lock is held (no
    reader can hold it then), else those of dead processes on this host."""
    host = socket.gethostname()
    path = lock_path(folder)
    for entry in path.parent.glob(_reader_prefix(folder) + "*"):
        record = _read_record_at(entry) or {}
        if everyone or (record.get("host") == host and not pid_alive(record.get("pid"))):
            try:
                entry.unlink()
            except OSError:
                pass


def _refusal(folder: Path, what: str, op: int) -> str:
    found = holders(folder)
    writers = [r for r in found if r.get("mode") == "exclusive"]
    if writers:
        who = describe(writers[0])
        action = "is being written" if op == fcntl.LOCK_SH else "is in use"
        return f"{what} {folder} {action} by {who}; wait for it to finish or stop it, then rerun"
    readers = "; ".join(describe(r) for r in found) or "another process (no record readable)"
    return (f"{what} {folder} is being read by {readers}; a {what} being read cannot be replaced or extended: "
            f"wait for it to finish or stop it, or write elsewhere")


def _write_record(fd: int, record: dict[str, Any]) -> None:
    data = json.dumps(record).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _read_record(fd: int) -> dict[str, Any] | None:
    try:
        data = os.pread(fd, 4096, 0)
        record = json.loads(data) if data.strip() else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _read_record_at(path: Path) -> dict[str, Any] | None:
    try:
        data = path.read_bytes()[:4096]
        record = json.loads(data) if data.strip() else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
