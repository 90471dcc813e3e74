"""Crash safety: disk full in the middle of a shard, and a writer killed with SIGKILL mid-write."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import zarr.storage._local as zarr_local

import cache
from cache import checksum
from tests.cache.cache_producer import SHARD_ROWS, expected_ends, new_writer, produce, write_cache

N_TRAIN, N_HELDOUT = 8, 3
REPO = Path(__file__).resolve().parents[2]


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _inject_enospc(monkeypatch, backend: str, target: str, allow: int = 1) -> None:
    """Make the real byte-writing call fail with ENOSPC after `allow` writes to `target` went through."""
    calls = {"n": 0}

    def should_fail(path: str) -> bool:
        if target not in path:
            return False
        calls["n"] += 1
        return calls["n"] > allow

    if backend == "safetensors":
        real_write = os.write

        def write(fd, data):
            if should_fail(_fd_path(fd)):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(fd, data)

        monkeypatch.setattr(os, "write", write)
    else:
        real_put = zarr_local._put

        def put(path, value, exclusive=False):
            if should_fail(str(path)):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_put(path, value, exclusive)

        monkeypatch.setattr(zarr_local, "_put", put)


def _assert_same_as_reference(folder: Path, ref: Path) -> None:
    got, want = cache.open(folder).manifest, cache.open(ref).manifest
    assert got["shards"] == want["shards"]
    assert got["rows"] == want["rows"] and got["stats"] == want["stats"]
    assert cache.verify(folder) == []


@pytest.mark.parametrize("async_write", [False, True])
def test_disk_full_during_a_shard_then_resume(tmp_path, backend, monkeypatch, async_write):
    ref = write_cache(tmp_path / "ref", backend, n_train=N_TRAIN, n_heldout=N_HELDOUT)
    folder = tmp_path / "c"
    bad = 2  # the third train shard hits a full disk
    _inject_enospc(monkeypatch, backend, f".tmp-train-{bad:06d}")
    w = new_writer(folder, backend, async_write=async_write)
    with pytest.raises(OSError, match=f"disk full while writing shard train-{bad:06d}.*free space and rerun") as info:
        produce(w, "train", N_TRAIN)
        w.finish()
    assert info.value.errno == errno.ENOSPC
    w.close()
    monkeypatch.undo()

    names = sorted(p.name for p in folder.iterdir())
    assert not [n for n in names if n.startswith(".tmp-")], names
    c = cache.open(folder, allow_incomplete=True)
    assert [s.index for s in c.shards("train")] == list(range(bad))
    assert names == sorted(["manifest.json"] + [s.name for s in c.shards("train")])
    assert cache.verify(folder) == []

    w = new_writer(folder, backend)
    assert w.resume_point("train") == expected_ends("train", N_TRAIN, SHARD_ROWS)[bad - 1]
    produce(w, "train", N_TRAIN, start=w.resume_point("train"))
    produce(w, "heldout", N_HELDOUT, start=w.resume_point("heldout"))
    w.finish()
    _assert_same_as_reference(folder, ref)


def test_disk_full_while_rewriting_the_manifest(tmp_path, monkeypatch):
    ref = write_cache(tmp_path / "ref", "safetensors", n_train=N_TRAIN, n_heldout=N_HELDOUT)
    folder = tmp_path / "c"
    w = new_writer(folder, "safetensors")
    produce(w, "train", 2)
    committed = cache.open(folder, allow_incomplete=True).manifest
    _inject_enospc(monkeypatch, "safetensors", ".tmp-manifest.json", allow=0)
    with pytest.raises(OSError, match="disk full while writing the manifest after shard"):
        produce(w, "train", N_TRAIN, start=(2, 0))
    w.close()
    monkeypatch.undo()
    assert cache.open(folder, allow_incomplete=True).manifest == committed  # the old manifest survives
    w = new_writer(folder, "safetensors")  # removes the shard that the manifest never listed
    produce(w, "train", N_TRAIN, start=w.resume_point("train"))
    produce(w, "heldout", N_HELDOUT, start=w.resume_point("heldout"))
    w.finish()
    _assert_same_as_reference(folder, ref)


_CHILD = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {repo!r})
    import torch
    torch.set_num_threads(1)
    from tests.cache.cache_producer import new_writer, produce

    real_fsync = os.fsync
    def fsync(fd):
        # Shard {stop} is fully written but not yet renamed: hold here until killed.
        if ".tmp-train-{stop:06d}" in os.readlink(f"/proc/self/fd/{{fd}}"):
            open({marker!r}, "w").close()
            time.sleep(120)
        return real_fsync(fd)
    os.fsync = fsync
    w = new_writer({folder!r}, {backend!r}, async_write=True)
    produce(w, "train", {n_train})
    produce(w, "heldout", {n_heldout})
    w.finish()
""")


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child exited early: {proc.stderr.read().decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("child never reached the shard write")
        time.sleep(0.02)


@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="needs Linux /proc")
def test_sigkill_mid_write_then_resume_equals_uninterrupted(tmp_path, backend):
    ref = write_cache(tmp_path / "ref", backend, n_train=N_TRAIN, n_heldout=N_HELDOUT)
    folder, marker, stop = tmp_path / "c", tmp_path / "marker", 3
    script = _CHILD.format(repo=str(REPO), stop=stop, marker=str(marker), folder=str(folder),
                           backend=backend, n_train=N_TRAIN, n_heldout=N_HELDOUT)
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    _wait_for(marker, proc)
    visible = cache.open(folder, allow_incomplete=True).shards("train")
    before = {s.name: checksum.hash_shard(folder / s.name) for s in visible}
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)

    assert len(visible) == stop
    assert (folder / f".tmp-train-{stop:06d}{'.zarr' if backend == 'zarr' else '.safetensors'}").exists()
    w = new_writer(folder, backend)
    assert not any(p.name.startswith(".tmp-") for p in folder.iterdir())
    produce(w, "train", N_TRAIN, start=w.resume_point("train"))
    produce(w, "heldout", N_HELDOUT, start=w.resume_point("heldout"))
    w.finish()
    assert {name: checksum.hash_shard(folder / name) for name in before} == before
    _assert_same_as_reference(folder, ref)


def test_durability_order_of_a_shard_commit(tmp_path, monkeypatch, backend):
    """fsync the data, rename, fsync the folder, and only then rewrite the manifest the same way."""
    log: list[tuple[str, str]] = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd):
        log.append(("fsync", Path(_fd_path(fd)).name))
        return real_fsync(fd)

    def rename(a, b):
        log.append(("rename", f"{Path(a).name}->{Path(b).name}"))
        return real_rename(a, b)

    def replace(a, b):
        log.append(("replace", f"{Path(a).name}->{Path(b).name}"))
        return real_replace(a, b)

    w = new_writer(tmp_path / "c", backend, shard_rows=8)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    produce(w, "train", 1)  # 17 rows: two shards of 8
    monkeypatch.undo()
    w.close()
    suffix = ".zarr" if backend == "zarr" else ".safetensors"
    tmp, final, folder = f".tmp-train-000000{suffix}", f"train-000000{suffix}", "c"
    i_rename = log.index(("rename", f"{tmp}->{final}"))
    assert ("fsync", tmp) in log[:i_rename]  # the shard's own bytes (zarr: its folder) are durable first
    assert log[i_rename + 1] == ("fsync", folder)
    i_manifest = log.index(("replace", ".tmp-manifest.json->manifest.json"))
    assert i_rename < log.index(("fsync", ".tmp-manifest.json")) < i_manifest
    assert log[i_manifest + 1] == ("fsync", folder)
    assert i_manifest < log.index(("rename", f".tmp-train-000001{suffix}->train-000001{suffix}"))
