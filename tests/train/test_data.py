"""ActivationLoader: coverage, held-out isolation, layer alignment, mixing, resume, seeds, threads.

Most tests use content="ids" caches (tests/train/cache_fixtures.py): every stored value encodes the
row's identity, and held-out rows are all HELDOUT_MARK, so a batch can be checked row by row against
an independent reading of the cache (`_stored`).
"""

from __future__ import annotations

import threading

import pytest
import torch

import cache
from tests.train.cache_fixtures import HELDOUT_MARK, decode_ids, write_cache
from train.data import ActivationLoader

N_TRAIN = 3000  # shards of 700 rows and a short last one of 200
LAYERS = [0, 1, 2]


@pytest.fixture(scope="module")
def ids_cache(tmp_path_factory):
    spec = write_cache(tmp_path_factory.mktemp("ids") / "c", content="ids", n_train=N_TRAIN, n_heldout=400,
                       layers=LAYERS, d_model=4, seq_len=16, window_seqs=8, shard_rows=700)
    with cache.open(spec.path) as c:
        yield c


def _stored(c: cache.Cache, layers: int | list[int]) -> torch.Tensor:
    """Every train row in cache order, read shard by shard: [N, d] or [N, L, d]."""
    parts = [c.read("train", i, layers).clone() for i in range(len(c.shards("train")))]
    return torch.cat(parts)


def _loader_threads() -> int:
    return sum(t.name == "ActivationLoader" and t.is_alive() for t in threading.enumerate())


def _take(loader: ActivationLoader, n: int, epoch: int = 0, batch: int = 0) -> list:
    it = loader.batches(epoch, batch)
    out = [next(it) for _ in range(n)]
    it.close()
    return out


@pytest.mark.parametrize(
    ("layers", "batch_size", "block_rows", "buffer_rows"),
    [
        (1, 100, 64, 512),  # batch divides N; blocks do not divide shards
        (LAYERS, 128, 64, 512),  # short last batch, three layers
        ([2, 0], 1000, 50, 300),  # batches span several buffers; layer order as asked
        (0, 4096, 256, 65536),  # one short batch per epoch, one buffer
    ],
)
def test_every_row_once_per_epoch(ids_cache, layers, batch_size, block_rows, buffer_rows):
    stored = _stored(ids_cache, layers)
    loader = ActivationLoader(ids_cache, layers, batch_size, block_rows=block_rows, buffer_rows=buffer_rows)
    n_batches = -(-N_TRAIN // batch_size)
    assert (loader.rows_per_epoch, loader.batches_per_epoch) == (N_TRAIN, n_batches)
    batches = _take(loader, 2 * n_batches)
    orders = []
    for epoch in range(2):
        epoch_batches = batches[epoch * n_batches:(epoch + 1) * n_batches]
        assert [(b.epoch, b.index) for b in epoch_batches] == [(epoch, i) for i in range(n_batches)]
        sizes = [b.x.shape[0] for b in epoch_batches]
        assert sizes == [batch_size] * (n_batches - 1) + [N_TRAIN - (n_batches - 1) * batch_size]
        rows = torch.cat([decode_ids(b.x)["row"].reshape(len(b.x), -1)[:, 0] for b in epoch_batches])
        assert torch.equal(rows.sort().values, torch.arange(N_TRAIN))  # every row exactly once
        for b in epoch_batches:  # each batch row is bitwise the stored row it claims to be
            assert b.x.dtype == torch.float32 and b.x.is_contiguous()
            ids = decode_ids(b.x)["row"].reshape(len(b.x), -1)[:, 0]
            assert torch.equal(b.x, stored[ids])
        orders.append(rows)
    assert not torch.equal(orders[0], orders[1])  # each epoch has its own order
    loader.close()


def test_multi_layer_batches_hold_the_same_rows(ids_cache):
    tokens = torch.cat([ids_cache.read_tokens("train", i)["sequence"] for i in range(len(ids_cache.shards("train")))])
    loader = ActivationLoader(ids_cache, [2, 0, 1], 96, block_rows=32, buffer_rows=256)
    for b in _take(loader, 40):
        n = len(b.x)
        assert b.x.shape == (n, 3, 4) and n in (96, N_TRAIN % 96)
        ids = decode_ids(b.x)
        assert torch.equal(ids["layer"], torch.tensor([2, 0, 1]).expand(n, 3))  # stacking order = list order
        assert (ids["row"] == ids["row"][:, :1]).all()  # the same row in every layer
        assert torch.equal(ids["sequence"][:, 0], tokens[ids["row"][:, 0]])  # row matches its token record
    loader.close()


def test_heldout_rows_never_appear(ids_cache):
    loader = ActivationLoader(ids_cache, LAYERS, 256, block_rows=32, buffer_rows=512)
    for b in _take(loader, 3 * loader.batches_per_epoch):
        assert (b.x >= 0).all(), "a held-out (marked) row reached a training batch"
    loader.close()
    # The mark is visible to this check: the held-out split itself yields only marked rows.
    heldout = ActivationLoader(ids_cache, 0, 256, split="heldout")
    x = _take(heldout, 1)[0].x
    assert heldout.rows_per_epoch == 400 and (x == HELDOUT_MARK).all()
    heldout.close()


@pytest.mark.parametrize("positions", [[(0, 0), (0, 7), (0, 8), (0, 23), (1, 0), (1, 13), (2, 23)]])
def test_resume_is_bitwise_identical(ids_cache, positions):
    loader = ActivationLoader(ids_cache, [0, 2], 128, block_rows=64, buffer_rows=1024, seed=3)
    per_epoch = loader.batches_per_epoch  # 24: positions above cover buffer edges and epoch ends
    full = _take(loader, 3 * per_epoch)
    for epoch, index in positions:
        start = epoch * per_epoch + index
        resumed = _take(loader, min(12, len(full) - start), epoch, index)
        for want, got in zip(full[start:], resumed, strict=False):
            assert (got.epoch, got.index, got.next_position) == (want.epoch, want.index, want.next_position)
            assert torch.equal(got.x, want.x)
    for prev, nxt in zip(full, full[1:], strict=False):  # next_position chains the batches
        assert prev.next_position == (nxt.epoch, nxt.index)
    # A saved "next position" just past an epoch's last batch is the next epoch's start.
    assert torch.equal(_take(loader, 1, 0, per_epoch)[0].x, full[per_epoch].x)
    loader.close()


def test_seeds_fix_the_order(ids_cache):
    def order(seed: int) -> torch.Tensor:
        loader = ActivationLoader(ids_cache, 0, 200, seed=seed, block_rows=32, buffer_rows=512)
        rows = torch.cat([decode_ids(b.x)["row"] for b in _take(loader, 15)])
        loader.close()
        return rows

    assert torch.equal(order(5), order(5))
    assert not torch.equal(order(5), order(6))


def test_mixing_matches_a_uniform_shuffle(tmp_path):
    """Share of batch rows that share a sequence with another row of the batch vs 1 - (1 - B/N)^(S-1).

    A scaled-down default harvest: sequences of S=32 rows, harvest windows of 64 sequences (W=2048
    rows, shuffled), blocks of 16 rows, buffers of 4096 rows, batches of 256, N=32768. The buffer's
    share of a batch, B/buffer = 1/16, is the default's (4096/65536), and the block structure's
    relative excess over a uniform shuffle, (block/W)*(N/buffer) = 6%, is about the default's
    (64/32256 * 1.79M/65536 = 5%). Tolerance 0.025: that excess adds about 0.012 to the share, and
    two epochs of batches leave noise of about 0.003 (uniform shuffles of the same rows: 0.215-0.219).
    """
    n, s, b = 32768, 32, 256
    spec = write_cache(tmp_path / "c", content="ids", n_train=n, n_heldout=0, layers=[0], d_model=4,
                       seq_len=s, window_seqs=64, shard_rows=4096)
    expected = 1 - (1 - b / n) ** (s - 1)

    def share(buffer_rows: int) -> float:
        with cache.open(spec.path) as c:
            loader = ActivationLoader(c, 0, b, block_rows=16, buffer_rows=buffer_rows, seed=1)
            shares = []
            for batch in _take(loader, 2 * loader.batches_per_epoch):
                _, inverse, counts = torch.unique(decode_ids(batch.x)["sequence"], return_inverse=True,
                                                  return_counts=True)
                shares.append((counts[inverse] >= 2).float().mean().item())
            loader.close()
        return sum(shares) / len(shares)

    assert abs(share(4096) - expected) < 0.025
    # Without the buffer's row shuffle (one block per buffer) the check fails: it can tell.
    assert share(16) > expected + 0.08


class _CountingCache:
    """A cache whose reads are counted (rows x layers), and can be made to fail after some calls."""

    backend = "counting"  # not "safetensors": the loader then reads block by block, as it does for zarr

    def __init__(self, inner: cache.Cache, fail_after: int | None = None) -> None:
        self.inner, self.fail_after, self.calls, self.rows = inner, fail_after, 0, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def read(self, split, shard, layers, start=0, stop=None):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise OSError(5, f"simulated I/O error reading shard {shard}")
        out = self.inner.read(split, shard, layers, start, stop)
        self.rows += out.shape[0]
        return out


def test_reads_are_bounded_by_the_buffer(ids_cache):
    counting = _CountingCache(ids_cache)
    loader = ActivationLoader(counting, [0, 1], 100, block_rows=50, buffer_rows=500, prefetch=1)
    _take(loader, loader.batches_per_epoch)
    # One epoch reads each row once per layer; the thread may also have read ahead into the next
    # epoch (the buffer after the last one, a part of the one after that: under 3 buffers).
    assert 2 * N_TRAIN <= counting.rows < 2 * (N_TRAIN + 3 * 500)
    counting.rows = 0
    _take(loader, 1, 5, loader.batches_per_epoch - 1)  # resuming 5 epochs in reads no skipped row
    assert counting.rows < 2 * 3 * 500
    loader.close()


def test_thread_error_reaches_the_consumer(ids_cache):
    loader = ActivationLoader(_CountingCache(ids_cache, fail_after=30), 0, 100, block_rows=50, buffer_rows=500)
    with pytest.raises(OSError, match="simulated I/O error"):
        for _ in loader.batches():
            pass
    loader.close()
    assert _loader_threads() == 0


def test_close_and_break_stop_the_thread(ids_cache):
    before = _loader_threads()
    loader = ActivationLoader(ids_cache, 0, 100)
    it = loader.batches()
    next(it)
    assert _loader_threads() == before + 1
    loader.close()
    assert _loader_threads() == before
    assert list(it) == []  # a stopped iteration simply ends
    with pytest.raises(RuntimeError, match="after close"):
        loader.batches()
    with ActivationLoader(ids_cache, 0, 100) as loader2:
        for _ in loader2.batches():
            break  # leaving the loop stops the thread too
    assert _loader_threads() == before


@pytest.mark.parametrize("stored_dtype", ["bfloat16", "float16"])
def test_dtype_conversion_is_exact(tmp_path, stored_dtype):
    spec = write_cache(tmp_path / "c", content="ids", n_train=250, n_heldout=10, layers=[3], d_model=4,
                       dtype=stored_dtype, shard_rows=64)
    with cache.open(spec.path) as c:
        stored = _stored(c, 3)
        assert stored.dtype == getattr(torch, stored_dtype)
        for out_dtype in (torch.float32, stored.dtype, torch.float64):
            loader = ActivationLoader(c, 3, 64, block_rows=16, buffer_rows=64, dtype=out_dtype)
            for b in _take(loader, loader.batches_per_epoch):
                assert b.x.dtype == out_dtype
                rows = decode_ids(b.x.float())["row"]
                assert torch.equal(b.x, stored[rows].to(out_dtype))  # widening is exact
            loader.close()


def test_zarr_backend_covers_every_row(tmp_path):
    spec = write_cache(tmp_path / "z", content="ids", n_train=900, n_heldout=50, layers=[0, 1], d_model=4,
                       backend="zarr", shard_rows=400)
    with cache.open(spec.path) as c:
        stored = _stored(c, [0, 1])
        loader = ActivationLoader(c, [0, 1], 128, block_rows=64, buffer_rows=256)
        batches = _take(loader, loader.batches_per_epoch)
        rows = torch.cat([decode_ids(b.x)["row"][:, 0] for b in batches])
        assert torch.equal(rows.sort().values, torch.arange(900))
        assert all(torch.equal(b.x, stored[decode_ids(b.x)["row"][:, 0]]) for b in batches)
        loader.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layers": 7}, r"layer 7 is not in the cache .* layers \[0, 1, 2\]"),
        ({"layers": [0, 0]}, "twice"),
        ({"layers": []}, "empty"),
        ({"batch_size": 0}, "batch_size must be an int >= 1"),
        ({"block_rows": 2.5}, "block_rows"),
        ({"split": "validation"}, "unknown split 'validation'"),
        ({"dtype": torch.int32}, "floating"),
    ],
)
def test_bad_arguments_are_named(ids_cache, kwargs, message):
    args = {"layers": 0, "batch_size": 64, **kwargs}
    with pytest.raises(ValueError, match=message):
        ActivationLoader(ids_cache, args.pop("layers"), args.pop("batch_size"), **args)


def test_bad_position_is_refused(ids_cache):
    loader = ActivationLoader(ids_cache, 0, 1000)  # 3 batches per epoch
    for epoch, batch in [(0, 4), (-1, 0), (0, -1)]:
        with pytest.raises(ValueError, match=r"batches 0\.\.2"):
            loader.batches(epoch, batch)
    loader.close()
