"""durable.lock: one writer or many readers per folder, refusals naming the holder, dead holders taken over."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket

import pytest

from durable import lock
from tests.lock_holder import holder, kill, start_holder


def test_a_second_writer_is_refused_naming_folder_and_holder(tmp_path):
    with holder(tmp_path / "c") as proc:
        with pytest.raises(lock.LockHeld) as info:
            lock.exclusive(tmp_path / "c", "cache")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"cache {tmp_path / 'c'} is in use by pid {proc.pid} on ")
    for part in (str(tmp_path / "c"), f"pid {proc.pid}", socket.gethostname(), "since", "command:"):
        assert part in message, (part, message)


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_note(tmp_path):
    proc = start_holder(tmp_path / "c")
    kill(proc)
    with lock.exclusive(tmp_path / "c", "cache") as held:
        assert any(f"pid {proc.pid}" in n and "no longer runs" in n for n in held.notes)
        record = json.loads(lock.lock_path(tmp_path / "c").read_text())
        assert record["pid"] == os.getpid() and record["mode"] == "exclusive"
    # released: the record is emptied, so the next holder has nothing to take over
    assert lock.lock_path(tmp_path / "c").read_text() == ""
    with lock.exclusive(tmp_path / "c") as again:
        assert again.notes == []


def test_readers_share_and_keep_writers_out(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    with holder(folder, "shared") as reader:
        with lock.shared(folder):  # a second reader is welcome
            pass
        with pytest.raises(lock.LockHeld, match=rf"being read by pid {reader.pid} .*cannot be replaced"):
            lock.exclusive(folder, "cache")
    with holder(folder, "exclusive") as writer:
        with pytest.raises(lock.LockHeld, match=rf"being written by pid {writer.pid}"):
            lock.shared(folder, "cache")
    assert not [p for p in tmp_path.iterdir() if "reader" in p.name]  # every reader record is gone
    assert [p.name for p in folder.iterdir()] == []  # the folder itself is never touched


def test_reentrant_within_a_process(tmp_path):
    outer = lock.exclusive(tmp_path / "c")
    inner = lock.exclusive(tmp_path / "c")
    assert inner is outer
    inner.release()
    with holder(tmp_path / "other"):
        pass
    # still held by the outer one: another process is refused
    with pytest.raises(RuntimeError):
        start_holder(tmp_path / "c")
    outer.release()
    kill(start_holder(tmp_path / "c"))


def test_a_read_only_folder_without_a_lock_file_is_read_unlocked(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: permissions do not stop root from creating the lock file")
    parent = tmp_path / "ro"
    (parent / "c").mkdir(parents=True)
    parent.chmod(0o555)
    try:
        with lock.shared(parent / "c") as held:
            assert held.fd is None
    finally:
        parent.chmod(0o755)


@pytest.fixture
def no_flock(monkeypatch):
    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", refuse)


def _plant(folder, pid, host):
    lock.lock_path(folder).write_text(json.dumps({"pid": pid, "host": host, "mode": "exclusive",
                                                     "started": "then", "command": "python -m harvest"}))


def test_without_flock_a_live_holder_on_this_host_is_refused(tmp_path, no_flock):
    _plant(tmp_path / "c", os.getppid(), socket.gethostname())  # our parent: alive
    with pytest.raises(lock.LockHeld, match=f"pid {os.getppid()}"):
        lock.exclusive(tmp_path / "c", "cache")


def test_without_flock_a_dead_holder_on_this_host_is_taken_over(tmp_path, no_flock):
    proc = start_holder(tmp_path / "scratch")
    kill(proc)  # a pid that surely is not running now
    _plant(tmp_path / "c", proc.pid, socket.gethostname())
    with lock.exclusive(tmp_path / "c", "cache") as held:
        assert any("no longer runs" in n for n in held.notes)


def test_without_flock_a_holder_on_another_host_is_refused_naming_the_file_to_delete(tmp_path, no_flock):
    _plant(tmp_path / "c", 12345, "elsewhere.example")
    with pytest.raises(lock.LockHeld, match=rf"another host.*delete {lock.lock_path(tmp_path / 'c')}"):
        lock.exclusive(tmp_path / "c", "cache")
