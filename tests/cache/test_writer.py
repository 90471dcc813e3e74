"""Writer rules: identity, overwrite, foreign folders, leftovers, extension, argument checks, async."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

import cache
from cache import checksum
from tests.cache.cache_producer import (
    IDENTITY,
    LAYERS,
    SHARD_ROWS,
    all_rows,
    expected_ends,
    make_chunk,
    new_writer,
    produce,
    write_cache,
)


def _snapshot(folder) -> dict[str, str]:
    return {p.name: checksum.hash_shard(p)[1] for p in sorted(folder.iterdir())}


def test_different_identity_is_refused_and_nothing_changes(tmp_path, backend):
    write_cache(tmp_path / "c", backend, n_train=3)
    before = _snapshot(tmp_path / "c")
    other = dict(IDENTITY, revision="1", seq_len=32)
    with pytest.raises(ValueError, match=r"identity.revision \('0' in the cache, '1' requested\); "
                                         r"identity.seq_len .*use --overwrite \(OVERWRITE=1\) to replace it"):
        new_writer(tmp_path / "c", backend, identity=other)
    with pytest.raises(ValueError, match=r"dtype \('float32' in the cache, 'bfloat16' requested\)"):
        new_writer(tmp_path / "c", backend, dtype="bfloat16")
    with pytest.raises(ValueError, match=r"layers \("):
        new_writer(tmp_path / "c", backend, layers=[0, 2])
    assert _snapshot(tmp_path / "c") == before
    assert cache.open(tmp_path / "c").complete


def test_overwrite_replaces_only_cache_files(tmp_path, backend):
    write_cache(tmp_path / "c", backend, n_train=4)
    (tmp_path / "c" / "notes.txt").write_text("mine")
    w = new_writer(tmp_path / "c", backend, identity=dict(IDENTITY, revision="1"), overwrite=True)
    produce(w, "train", 1)
    w.finish()
    c = cache.open(tmp_path / "c")
    assert c.identity["revision"] == "1"
    assert c.num_rows("train") == all_rows("train", 1)[0][0].shape[0]
    assert (tmp_path / "c" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "c").iterdir() if p.name.startswith("train")) == \
        [s.name for s in c.shards("train")]


@pytest.mark.parametrize("overwrite", [False, True])
def test_non_cache_folder_is_never_touched(tmp_path, overwrite):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match="is not empty and holds no cache.*refusing to touch it"):
        new_writer(folder, "safetensors", overwrite=overwrite)
    assert [p.name for p in folder.iterdir()] == ["thesis.tex"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        new_writer(tmp_path / "file", "safetensors", overwrite=overwrite)


def test_empty_existing_folder_becomes_a_cache(tmp_path):
    (tmp_path / "c").mkdir()
    write_cache(tmp_path / "c", "safetensors", n_train=1)
    assert cache.open(tmp_path / "c").num_rows("train") > 0


def test_resume_removes_temporaries_and_orphan_shards(tmp_path, backend):
    write_cache(tmp_path / "c", backend, n_train=3, finish=False)
    folder = tmp_path / "c"
    m = json.loads((folder / "manifest.json").read_text())
    n = len(m["shards"]["train"])
    last = folder / m["shards"]["train"][-1]["name"]
    # A shard renamed just before a crash (not yet in the manifest) and a half-written temp.
    orphan = folder / m["shards"]["train"][-1]["name"].replace(f"{n - 1:06d}", f"{n:06d}")
    if backend == "zarr":
        import shutil

        shutil.copytree(last, orphan)
        (folder / ".tmp-train-000009.zarr").mkdir()
    else:
        orphan.write_bytes(last.read_bytes())
        (folder / ".tmp-train-000009.safetensors").write_bytes(b"partial")
    w = new_writer(folder, backend)
    assert not orphan.exists()
    assert not any(p.name.startswith(".tmp-") for p in folder.iterdir())
    assert w.resume_point("train") == tuple(m["shards"]["train"][-1]["end"])
    w.close()


def test_extension_of_a_complete_cache_appends_after_it(tmp_path, backend):
    write_cache(tmp_path / "c", backend, n_train=3, n_heldout=1)
    before = cache.open(tmp_path / "c").manifest["shards"]["train"]
    w = new_writer(tmp_path / "c", backend)
    with pytest.raises(ValueError, match="incomplete"):
        cache.open(tmp_path / "c")
    produce(w, "train", 6, start=w.resume_point("train"))
    w.finish({"budget": 6})
    c = cache.open(tmp_path / "c")
    assert c.manifest["shards"]["train"][:len(before)] == before
    assert c.num_rows("train") == all_rows("train", 6)[0][0].shape[0]
    assert c.metadata == {"model": "tiny-test", "budget": 6}
    # The short last shard of the first run stays short; the extension follows it.
    assert [s.end for s in c.shards("train")][:len(before)] == expected_ends("train", 3, SHARD_ROWS)


def test_resume_point_and_row_counts(tmp_path, backend):
    w = new_writer(tmp_path / "c", backend)
    assert w.resume_point("train") == (0, 0) and w.rows_written("train") == 0
    produce(w, "train", 5)
    ends = expected_ends("train", 5, SHARD_ROWS)
    total = all_rows("train", 5)[0][0].shape[0]
    assert w.rows_appended("train") == total
    assert w.rows_written("train") == SHARD_ROWS * (total // SHARD_ROWS)
    assert w.resume_point("train") == ends[total // SHARD_ROWS - 1]
    w.flush()
    assert w.rows_written("train") == total and w.resume_point("train") == ends[-1]
    w.close()


def _args(n: int = 4, d: int = 12, layers=LAYERS) -> dict:
    tok = torch.zeros(n, dtype=torch.int64)
    return dict(acts={L: torch.zeros(n, d) for L in layers}, token_ids=tok, sequence=tok, position=tok,
                document=tok)


@pytest.mark.parametrize("change, message", [
    (dict(acts={0: torch.zeros(4, 12)}), r"acts must map exactly the cache's layers \[0, 2, 5\]"),
    (_args(d=7), r"acts\[0\] must be a float tensor \[n, 12\]"),
    (dict(token_ids=torch.zeros(4)), r"token_ids must be an integer tensor \[4\]"),
    (dict(position=torch.zeros(3, dtype=torch.int64)), r"position must be an integer tensor \[4\]"),
    (dict(token_ids=torch.full((4,), 2**40)), r"token_ids values must lie in \[0, 2147483647\]"),
    (dict(document=[0, 0, 0, 0]), "needs torch tensors"),
])
def test_append_rejects_bad_input(tmp_path, change, message):
    w = new_writer(tmp_path / "c", "safetensors")
    with pytest.raises(ValueError, match=message):
        w.append("train", chunk=0, offset=0, **{**_args(), **change})
    with pytest.raises(ValueError, match="split must be one of"):
        w.append("valid", chunk=0, offset=0, **_args())
    w.close()


def test_append_refuses_to_go_back(tmp_path):
    w = new_writer(tmp_path / "c", "safetensors")
    w.append("train", chunk=2, offset=5, **_args())
    with pytest.raises(ValueError, match=r"starts before the end of the rows already appended.*\(2, 9\)"):
        w.append("train", chunk=2, offset=8, **_args())
    with pytest.raises(ValueError, match="chunk must be an int >= 0"):
        w.append("train", chunk=-1, offset=0, **_args())
    w.append("heldout", chunk=0, offset=0, **_args())  # cursors are per split
    w.close()


def test_constructor_rejects_bad_arguments(tmp_path):
    base = dict(layers=[1], d_model=4, dtype="float32", shard_rows=8, identity={}, metadata={})
    for change, message in [(dict(dtype="fp8"), "dtype must be one of"), (dict(layers=[]), "layers must"),
                            (dict(backend="hdf5"), "backend must be one of"),
                            (dict(shard_rows=0), "shard_rows must"),
                            (dict(identity={"x": object()}), "identity must be JSON-serialisable"),
                            (dict(zarr_compression="lz4", backend="zarr"), "zarr_compression must be"),
                            (dict(workers=0), "workers must be >= 1"), (dict(max_inflight=0), "max_inflight must"),
                            (dict(workers=1.5), "workers must be an int"),
                            (dict(max_inflight=3, max_uncommitted=2), "max_uncommitted must be >= max_inflight")]:
        with pytest.raises(ValueError, match=message):
            cache.CacheWriter(tmp_path / "c", **{**base, **change})


def test_writer_accepts_other_float_dtypes_and_copies_its_input(tmp_path, backend):
    w = new_writer(tmp_path / "c", backend, dtype="bfloat16", shard_rows=100)
    data = make_chunk("train", 0)
    n = data["token_ids"].shape[0]
    acts = {L: t.double() for L, t in data["acts"].items()}
    w.append("train", chunk=0, offset=0, acts=acts, token_ids=data["token_ids"], sequence=data["sequence"],
             position=data["position"], document=data["document"])
    acts[0].zero_()  # a producer reusing its buffer must not change what was appended
    w.finish()
    got = cache.open(tmp_path / "c").read("train", 0, 0)
    assert got.shape == (n, 12) and torch.equal(got, data["acts"][0].double().to(torch.bfloat16))


def test_async_writer_matches_sync_writer(tmp_path, backend):
    write_cache(tmp_path / "sync", backend, n_train=6, n_heldout=2)
    write_cache(tmp_path / "async", backend, n_train=6, n_heldout=2, async_write=True)
    a = cache.open(tmp_path / "sync").manifest
    b = cache.open(tmp_path / "async").manifest
    assert a["shards"] == b["shards"] and a["stats"] == b["stats"]


def test_async_writer_prepares_on_worker_threads_with_a_bounded_number_in_flight(tmp_path, monkeypatch):
    from cache import shardio

    gate = threading.Event()
    threads = []
    real = shardio.write_tmp

    def slow(*a, **kw):
        threads.append(threading.current_thread().name)
        gate.wait(10)
        return real(*a, **kw)

    monkeypatch.setattr(shardio, "write_tmp", slow)
    w = new_writer(tmp_path / "c", "safetensors", shard_rows=4, async_write=True, workers=2, max_inflight=3)
    w.append("train", chunk=0, offset=0, **_args(12))  # 3 shards: 2 being written, 1 queued; no wait yet
    assert w.rows_written("train") == 0
    blocked = threading.Thread(target=lambda: w.append("train", chunk=1, offset=0, **_args(4)))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive(), "at most max_inflight=3 shards may be pending: the 4th must wait"
    gate.set()
    blocked.join(10)
    assert not blocked.is_alive()
    w.finish()
    assert set(threads) == {"cache-writer-0", "cache-writer-1"}
    assert cache.open(tmp_path / "c").num_rows("train") == 16


def test_statistics_run_ahead_of_the_writes_on_a_thread_of_their_own(tmp_path, monkeypatch):
    from cache import shardio
    from cache import writer as writer_mod

    gate = threading.Event()
    stats_threads, real_write, real_sums = [], shardio.write_tmp, writer_mod.host_row_sums

    def sums(*a, **kw):
        stats_threads.append(threading.current_thread().name)
        return real_sums(*a, **kw)

    monkeypatch.setattr(shardio, "write_tmp", lambda *a, **kw: (gate.wait(10), real_write(*a, **kw))[1])
    monkeypatch.setattr(writer_mod, "host_row_sums", sums)
    w = new_writer(tmp_path / "c", "safetensors", shard_rows=4, async_write=True, workers=1, max_inflight=3)
    w.append("train", chunk=0, offset=0, **_args(12))  # 3 shards; the one worker waits in the first write
    deadline = time.monotonic() + 10
    while len(stats_threads) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stats_threads == ["cache-stats"] * 3  # all three, while no write has finished
    assert w.rows_written("train") == 0
    gate.set()
    w.finish()
    ref = new_writer(tmp_path / "sync", "safetensors", shard_rows=4)  # statistics inside the write
    ref.append("train", chunk=0, offset=0, **_args(12))
    ref.finish()
    assert cache.open(tmp_path / "c").manifest["stats"] == cache.open(tmp_path / "sync").manifest["stats"]


def test_a_failure_in_the_statistics_step_fails_its_shard_like_one_in_the_write(tmp_path, monkeypatch):
    from cache import writer as writer_mod

    calls, real_sums = [], writer_mod.host_row_sums

    def sums(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("cache.stats: the statistics kernel could not allocate its buffers")
        return real_sums(*a, **kw)

    monkeypatch.setattr(writer_mod, "host_row_sums", sums)
    w = new_writer(tmp_path / "c", "safetensors", shard_rows=4, async_write=True, workers=2)
    with pytest.raises(MemoryError, match="statistics kernel"):
        for i in range(50):  # shard 1 fails; the error surfaces on one of the next calls
            w.append("train", chunk=i, offset=0, **_args(4))
        w.flush()
    w.close()
    c = cache.open(tmp_path / "c", allow_incomplete=True)
    assert [s.name.split(".")[0] for s in c.shards("train")] == ["train-000000"]
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["manifest.json", c.shards("train")[0].name]


def test_the_producer_is_told_of_the_first_failed_shard_even_when_a_later_one_fails_first():
    from cache.pipeline import Job, Pipeline

    def prepare(job):
        if job.seq == 1:
            time.sleep(0.2)  # shard 1 fails last, shard 2 at once
            raise RuntimeError("shard 1")
        if job.seq == 2:
            raise RuntimeError("shard 2")

    committed = []
    p = Pipeline(prepare=prepare, commit=lambda jobs: committed.extend(j.seq for j in jobs),
                 discard=lambda job: None, next_index={"t": 0}, workers=2, max_inflight=4, max_uncommitted=4)
    for k in (0, 1, 2):
        p.submit(Job(k, "t", k, str(k), 1, (0, 0), None, lambda: None))
    time.sleep(0.05)  # shard 2 has failed; shard 1 is still being written
    with pytest.raises(RuntimeError, match="shard 1"):  # as if the shards had been written one by one
        p.submit(Job(3, "t", 3, "3", 1, (0, 0), None, lambda: None))
    p.close()
    assert committed == [0]


def test_async_writer_keeps_a_bounded_number_of_shard_buffers(tmp_path):
    w = new_writer(tmp_path / "c", "safetensors", shard_rows=8, async_write=True, workers=2, max_inflight=2)
    produce(w, "train", 12)  # ~35 shards of 8 rows
    produce(w, "heldout", 4)
    w.finish()
    made = w._buffers.acts(torch.device("cpu"))._made
    assert 1 <= made <= 2 + 2, made  # in flight, plus one filling per split
    assert cache.open(tmp_path / "c").num_rows("train") == all_rows("train", 12)[0][0].shape[0]


def test_async_writer_error_surfaces_on_next_call_and_stops_later_shards(tmp_path, backend):
    w = new_writer(tmp_path / "c", backend, dtype="float16", shard_rows=4, async_write=True)
    good = _args(4)
    bad = _args(4)
    bad["acts"] = {L: torch.full((4, 12), 1e6) for L in LAYERS}  # overflows float16
    w.append("train", chunk=0, offset=0, **good)
    w.append("train", chunk=1, offset=0, **bad)  # queued: the thread finds the problem later
    with pytest.raises(ValueError, match="shard train-000001.*non-finite"):
        for i in range(2, 50):  # the error surfaces on one of the next calls
            w.append("train", chunk=i, offset=0, **good)
        w.flush()
    with pytest.raises(ValueError, match="non-finite"):
        w.finish()
    w.close()
    c = cache.open(tmp_path / "c", allow_incomplete=True)
    assert [s.name.split(".")[0] for s in c.shards("train")] == ["train-000000"]
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["manifest.json", c.shards("train")[0].name]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shards_and_statistics_do_not_depend_on_how_rows_were_appended(tmp_path, backend, dtype):
    """The same rows appended whole, or in uneven pieces handed over without a copy (copy=False), or copied
    piece by piece: the same shard bytes and the same float64 statistics, bit for bit."""
    g = torch.Generator().manual_seed(3)
    n = 3 * SHARD_ROWS + 17
    acts = {L: (torch.randn(n, 12, generator=g) * (L + 1)).to(getattr(torch, dtype)) for L in LAYERS}
    tok = torch.arange(n)
    cuts = [0, 5, 6, 47, 48, 90, 131, n]  # pieces of 1 to 47 rows, crossing shard boundaries

    def write(folder, pieces, copy):
        w = new_writer(folder, backend, dtype=dtype, async_write=True, workers=2)
        for a, b in pieces:
            w.append("train", chunk=0, offset=a, acts={L: t[a:b] for L, t in acts.items()}, token_ids=tok[a:b],
                     sequence=tok[a:b], position=tok[a:b], document=tok[a:b], copy=copy)
        w.finish()
        return cache.open(folder).manifest

    whole = write(tmp_path / "whole", [(0, n)], True)
    pieces = list(zip(cuts, cuts[1:], strict=False))
    for name, copy in (("pieces-handed-over", False), ("pieces-copied", True)):
        got = write(tmp_path / name, pieces, copy)
        assert got["shards"] == whole["shards"], name
        assert got["stats"] == whole["stats"], name
    assert torch.equal(cache.open(tmp_path / "whole").read("train", 1, 5), acts[5][SHARD_ROWS:2 * SHARD_ROWS])


def test_an_error_while_giving_buffers_back_is_raised_not_a_hang(tmp_path, monkeypatch):
    from cache import buffer

    def broken(self, item, event=None):
        raise RuntimeError("pool broken")

    w = new_writer(tmp_path / "c", "safetensors", shard_rows=4, async_write=True, workers=2)
    monkeypatch.setattr(buffer.Pool, "give", broken)
    outcome = []

    def run():
        try:
            w.append("train", chunk=0, offset=0, **_args(12))
            w.flush()
        except RuntimeError as exc:
            outcome.append(str(exc))
        finally:
            w.close()

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    assert not t.is_alive(), "the writer hung after a failure in a worker thread"
    assert outcome == ["pool broken"]


def test_written_shards_wait_for_their_commit_without_holding_rows(tmp_path, monkeypatch):
    """While the manifest rewrite is held, shards keep being written up to max_uncommitted, and those
    written let go of their rows: memory is bounded by max_inflight, what a crash loses by max_uncommitted."""
    from cache import manifest as manifest_mod
    from cache import shardio

    gate, held, real_save, real_write = threading.Event(), threading.Event(), manifest_mod.save, shardio.write_tmp
    calls = []

    def slow_save(*a, **kw):
        calls.append(1)
        if len(calls) > 1:  # the first rewrite opens the cache; hold the commits after it
            held.set()
            gate.wait(30)
        return real_save(*a, **kw)

    def write_tmp(folder, name, *a, **kw):
        if not name.startswith("train-000000"):
            held.wait(30)  # shard 0 is committed alone, and its commit is held before the others are written
        return real_write(folder, name, *a, **kw)

    monkeypatch.setattr(manifest_mod, "save", slow_save)
    monkeypatch.setattr(shardio, "write_tmp", write_tmp)
    w = new_writer(tmp_path / "c", "safetensors", shard_rows=4, async_write=True, workers=2, max_inflight=2,
                   max_uncommitted=5)
    for i in range(5):  # five shards, handed over without a copy
        w.append("train", chunk=i, offset=0, copy=False, **_args(4))
    deadline = time.monotonic() + 30
    while len(list((tmp_path / "c").glob(".tmp-train-*"))) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)  # shard 0 sits in the held commit, renamed; shards 1-4 wait under temporary names
    waiting = [job for ready in w._pipeline._ready.values() for job in ready.values()]
    assert sorted(job.index for job in waiting) == [1, 2, 3, 4]
    assert all(job.payload is None for job in waiting), "written shards still hold their rows"
    blocked = threading.Thread(target=lambda: w.append("train", chunk=9, offset=0, **_args(4)))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive(), "a sixth shard must wait: max_uncommitted=5 are not committed yet"
    gate.set()
    blocked.join(30)
    w.finish()
    assert cache.open(tmp_path / "c").num_rows("train") == 24


def _listed_per_rewrite(monkeypatch) -> list[int]:
    """How many train shards each manifest rewrite lists, recorded as the rewrites happen."""
    from cache import manifest as manifest_mod

    real_save, listed = manifest_mod.save, []

    def save(folder, m, *a, **kw):
        listed.append(len(m["shards"]["train"]))
        return real_save(folder, m, *a, **kw)

    monkeypatch.setattr(manifest_mod, "save", save)
    return listed


def test_shards_finishing_within_the_commit_interval_share_one_rewrite_and_the_end_does_not_wait(
        tmp_path, monkeypatch):
    """With a long commit interval, the first shard is committed at once, the next ones wait for the
    interval and then share one rewrite; finish() commits what is left without waiting for it."""
    from cache import writer as writer_mod

    monkeypatch.setattr(writer_mod, "COMMIT_INTERVAL", 60.0)
    listed = _listed_per_rewrite(monkeypatch)
    w = new_writer(tmp_path / "c", "safetensors", shard_rows=4, async_write=True, workers=2, max_inflight=6,
                   max_uncommitted=6)
    w.append("train", chunk=0, offset=0, **_args(4))
    deadline = time.monotonic() + 30
    while w.rows_written("train") < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert w.rows_written("train") == 4, "the first shard is committed without waiting"
    for i in range(1, 5):
        w.append("train", chunk=i, offset=0, **_args(4))
    deadline = time.monotonic() + 30
    while len(list((tmp_path / "c").glob(".tmp-train-*"))) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert w.rows_written("train") == 4, "shards 1-4 are written, and wait for the interval to be listed"
    started = time.monotonic()
    w.finish()
    assert time.monotonic() - started < 30, "finish() must not wait for the commit interval"
    assert listed == [0, 1, 5, 5]  # open, shard 0, shards 1-4 together, finish (complete)
    assert cache.verify(tmp_path / "c") == []


def test_a_producer_at_max_uncommitted_gets_its_commit_without_waiting_for_the_interval(tmp_path, monkeypatch):
    from cache import writer as writer_mod

    monkeypatch.setattr(writer_mod, "COMMIT_INTERVAL", 60.0)
    w = new_writer(tmp_path / "c", "safetensors", shard_rows=4, async_write=True, workers=2, max_inflight=2,
                   max_uncommitted=2)
    producer = threading.Thread(target=lambda: [w.append("train", chunk=i, offset=0, **_args(4)) for i in range(8)])
    producer.start()
    producer.join(30)
    assert not producer.is_alive(), "the producer waited for the commit interval at max_uncommitted"
    w.finish()
    assert cache.open(tmp_path / "c").num_rows("train") == 32
