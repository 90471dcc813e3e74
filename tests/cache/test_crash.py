"""Crash safety: disk full in the middle of a shard, and a writer killed with SIGKILL mid-write."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import zarr.storage._local as zarr_local

import cache
from cache import checksum, directio
from tests.cache.cache_producer import LAYERS, SHARD_ROWS, D, expected_ends, new_writer, produce, write_cache

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


@pytest.fixture(params=["direct", "page-cache"])
def io_path(request, monkeypatch) -> str:
    """safetensors shards written with O_DIRECT (in 4 KiB writes, so that a shard takes several) or
    through the page cache. On a filesystem without O_DIRECT both take the page-cache path."""
    if request.param == "direct":
        monkeypatch.setattr(directio, "CHUNK", 4096)
    else:
        monkeypatch.setattr(directio, "ENABLED", False)
    return request.param


@pytest.mark.parametrize("async_write", [False, True])
def test_disk_full_during_a_shard_then_resume(tmp_path, backend, monkeypatch, async_write, io_path):
    ref = write_cache(tmp_path / "ref", backend, n_train=N_TRAIN, n_heldout=N_HELDOUT)
    folder = tmp_path / "c"
    bad = 2  # the third train shard hits a full disk, after one write of it went through
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
    seen = {{}}
    def fsync(fd):
        # Hold the fsync of a file named in `hold` (fully written, not yet renamed or replaced) once
        # `skip` earlier fsyncs of that name went through, leaving a marker, until the test kills us.
        path = os.readlink(f"/proc/self/fd/{{fd}}")
        for name in {hold!r}:
            if name in path:
                seen[name] = seen.get(name, 0) + 1
                if seen[name] > {skip}:
                    open(os.path.join({markers!r}, name), "w").close()
                    time.sleep(120)
        return real_fsync(fd)
    os.fsync = fsync
    w = new_writer({folder!r}, {backend!r}, async_write=True, **{writer_kw!r})
    produce(w, "train", {n_train})
    produce(w, "heldout", {n_heldout})
    w.finish()
""")


def _wait_for(done, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if proc.poll() is not None:
            raise AssertionError(f"child exited early: {proc.stderr.read().decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"child never reached {what}")
        time.sleep(0.02)


def _kill_while_held(tmp_path: Path, backend: str, hold: list[str], n_train: int, writer_kw: dict,
                     listed: int, skip: int = 0) -> tuple[Path, dict[str, str]]:
    """Run a writer in a child process, kill it with SIGKILL once every fsync in `hold` is being held and
    the manifest lists `listed` train shards; return the folder and the checksums of the listed shards."""
    folder, markers = tmp_path / "c", tmp_path / "markers"
    markers.mkdir()
    script = _CHILD.format(repo=str(REPO), hold=hold, markers=str(markers), folder=str(folder), backend=backend,
                           writer_kw=writer_kw, n_train=n_train, n_heldout=N_HELDOUT, skip=skip)
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)

    def state() -> bool:
        if sorted(p.name for p in markers.iterdir()) != sorted(hold):
            return False
        try:
            return len(cache.open(folder, allow_incomplete=True).shards("train")) >= listed
        except (FileNotFoundError, ValueError):
            return False

    _wait_for(state, proc, f"the held fsyncs {hold}")
    visible = cache.open(folder, allow_incomplete=True).shards("train")
    before = {s.name: checksum.hash_shard(folder / s.name) for s in visible}
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert len(visible) == listed
    return folder, before


def _resume_and_compare(folder: Path, backend: str, ref: Path, n_train: int, before: dict) -> None:
    w = new_writer(folder, backend)
    assert not any(p.name.startswith(".tmp-") for p in folder.iterdir())
    produce(w, "train", n_train, start=w.resume_point("train"))
    produce(w, "heldout", N_HELDOUT, start=w.resume_point("heldout"))
    w.finish()
    assert {name: checksum.hash_shard(folder / name) for name in before} == before  # listed shards untouched
    _assert_same_as_reference(folder, ref)


def _suffix(backend: str) -> str:
    return ".zarr" if backend == "zarr" else ".safetensors"


@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="needs Linux /proc")
def test_sigkill_mid_write_then_resume_equals_uninterrupted(tmp_path, backend):
    """One shard at a time: the kill lands while shard 3 is written, after shards 0-2 were committed."""
    ref = write_cache(tmp_path / "ref", backend, n_train=N_TRAIN, n_heldout=N_HELDOUT)
    stop = 3
    folder, before = _kill_while_held(tmp_path, backend, [f".tmp-train-{stop:06d}"], N_TRAIN,
                                      {"workers": 1, "max_inflight": 1}, listed=stop)
    assert (folder / f".tmp-train-{stop:06d}{_suffix(backend)}").exists()
    _resume_and_compare(folder, backend, ref, N_TRAIN, before)


@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="needs Linux /proc")
def test_sigkill_with_several_shards_in_flight_then_resume_equals_uninterrupted(tmp_path, backend):
    """Three workers each hold a fully written shard (2, 3, 4) in its fsync, a fourth shard waits in the
    queue, the producer waits for a slot: the kill loses all four, and the rerun writes them again."""
    n_train = 12  # 6 full shards of 40 rows and a short one
    ref = write_cache(tmp_path / "ref", backend, n_train=n_train, n_heldout=N_HELDOUT)
    held = [f".tmp-train-{i:06d}" for i in (2, 3, 4)]
    folder, before = _kill_while_held(tmp_path, backend, held, n_train, {"workers": 3, "max_inflight": 4},
                                      listed=2)
    leftovers = sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp-"))
    assert leftovers == [name + _suffix(backend) for name in held]
    assert not (folder / f"train-000002{_suffix(backend)}").exists()
    _resume_and_compare(folder, backend, ref, n_train, before)


@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="needs Linux /proc")
def test_sigkill_between_renames_and_the_manifest_then_resume_equals_uninterrupted(tmp_path):
    """The kill lands after a group of shards was renamed into place but before the manifest listing them
    was written (its first rewrite after the one that opened the cache): the renamed shards are not part
    of the cache and are written again on resume."""
    ref = write_cache(tmp_path / "ref", "safetensors", n_train=N_TRAIN, n_heldout=N_HELDOUT)
    folder, before = _kill_while_held(tmp_path, "safetensors", [".tmp-manifest.json"], N_TRAIN,
                                      {"workers": 2, "max_inflight": 3}, listed=0, skip=1)
    m = json.loads((folder / "manifest.json").read_text())
    renamed = [p.name for p in folder.iterdir() if p.name.startswith("train-")]
    assert m["shards"]["train"] == [] and renamed, "the held manifest rewrite follows at least one rename"
    _resume_and_compare(folder, "safetensors", ref, N_TRAIN, before)


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


def test_shards_commit_in_order_and_those_that_finish_together_share_one_manifest_rewrite(tmp_path, monkeypatch,
                                                                                          backend):
    """Shard 1 is slow to write while shards 2 and 3 finish: the manifest must not list 2 and 3 before 1
    is durable, and once 1 is, the three are committed by a single manifest rewrite."""
    from cache import shardio

    release, finished = threading.Event(), []
    real_write, real_replace = shardio.write_tmp, os.replace
    manifest_writes = []

    def write_tmp(folder, name, *a, **kw):
        if name.startswith("train-000001"):
            release.wait(30)
        out = real_write(folder, name, *a, **kw)
        finished.append(name)
        return out

    def replace(a, b):
        if Path(b).name == "manifest.json":
            manifest_writes.append(json.loads(Path(a).read_text())["shards"]["train"])
        return real_replace(a, b)

    monkeypatch.setattr(shardio, "write_tmp", write_tmp)
    monkeypatch.setattr(os, "replace", replace)
    folder = tmp_path / "c"
    w = new_writer(folder, backend, shard_rows=8, async_write=True, workers=3, max_inflight=4)
    tok = torch.zeros(32, dtype=torch.int64)
    w.append("train", chunk=0, offset=0, acts={L: torch.randn(32, D) for L in LAYERS}, token_ids=tok,
             sequence=tok, position=tok, document=tok)  # shards 0-3
    deadline = time.monotonic() + 30
    while not (len(finished) == 3 and w.rows_written("train") == 8) and time.monotonic() < deadline:
        time.sleep(0.01)
    suffix = _suffix(backend)
    assert sorted(finished) == [f"train-00000{i}{suffix}" for i in (0, 2, 3)]
    assert [e["name"] for e in cache.open(folder, allow_incomplete=True).manifest["shards"]["train"]] == \
        [f"train-000000{suffix}"]
    assert not (folder / f"train-000002{suffix}").exists()  # prepared, waiting under its temporary name
    assert (folder / f".tmp-train-000002{suffix}").exists()
    writes_before = len(manifest_writes)
    release.set()
    w.finish()
    assert [len(shards) for shards in manifest_writes[writes_before:]] == [4, 4]  # the group, then finish()
    assert cache.verify(folder) == []
