"""Statistics are float64 sums over the stored (rounded) values, within FORMAT.md's bound of an exact
sum, and exact across a resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import cache
from tests.cache.cache_producer import LAYERS, all_rows, new_writer, produce, write_cache


def _reference(rows: torch.Tensor) -> tuple[np.ndarray, float, float]:
    x = rows.float().numpy().astype(np.float64)
    norms = np.sqrt((x ** 2).sum(axis=1))
    return x.mean(axis=0), float((norms ** 2).mean()), float(norms.mean())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stats_match_numpy_over_rows_read_back(tmp_path, backend, dtype):
    write_cache(tmp_path / "c", backend, n_train=6, n_heldout=3, dtype=dtype)
    c = cache.open(tmp_path / "c")
    for split in ("train", "heldout"):
        for layer in LAYERS:
            rows = torch.cat([c.read(split, i, layer) for i in range(len(c.shards(split)))])
            mean, msq, mnorm = _reference(rows)
            s = c.stats(split, layer)
            tol = 1e-6 * mnorm
            assert s.count == rows.shape[0]
            assert s.mean.dtype == np.float64 and s.mean.shape == (rows.shape[1],)
            assert np.abs(s.mean - mean).max() <= tol
            assert abs(s.mean_norm - mnorm) <= tol
            assert abs(s.mean_sq_norm - msq) <= 1e-6 * msq


def test_bf16_stats_are_of_the_stored_values_not_the_input(tmp_path, backend):
    write_cache(tmp_path / "c", backend, n_train=6, dtype="bfloat16")
    s = cache.open(tmp_path / "c").stats("train", 5)
    acts, _ = all_rows("train", 6)
    _, _, stored_norm = _reference(acts[5].to(torch.bfloat16))
    _, _, input_norm = _reference(acts[5])
    # Block sums in float32 keep the statistics within ~1e-8 of float64 here (FORMAT.md 2 promises
    # 1e-6 of the mean norm); the bf16 rounding moves the mean norm by more than 1e-6: the test can
    # tell which values were summed.
    assert abs(s.mean_norm - stored_norm) <= 1e-7 * stored_norm
    assert abs(input_norm - stored_norm) > 1e-6 * stored_norm


def test_norm_scale_is_sqrt_d_over_train_mean_norm(tmp_path, backend):
    write_cache(tmp_path / "c", backend, n_train=4)
    c = cache.open(tmp_path / "c")
    for layer in LAYERS:
        rows = torch.cat([c.read("train", i, layer) for i in range(len(c.shards("train")))])
        mean_norm = float(np.linalg.norm(rows.double().numpy(), axis=1).mean())
        assert math.isclose(c.norm_scale(layer), math.sqrt(c.d_model) / mean_norm, rel_tol=1e-6)  # FORMAT.md 2


def _check_resume_equals_uninterrupted(tmp_path, backend, dtype="float32", before_resume=lambda: None):
    write_cache(tmp_path / "ref", backend, n_train=7, n_heldout=3, dtype=dtype)
    w = new_writer(tmp_path / "c", backend, dtype=dtype)
    produce(w, "train", 3)
    w.close()  # buffered rows are dropped, as after a crash
    before_resume()
    w = new_writer(tmp_path / "c", backend, dtype=dtype)
    produce(w, "train", 7, start=w.resume_point("train"))
    produce(w, "heldout", 3, start=w.resume_point("heldout"))
    w.finish()
    ref = cache.open(tmp_path / "ref").manifest
    got = cache.open(tmp_path / "c").manifest
    assert got["stats"] == ref["stats"]
    assert got["shards"] == ref["shards"]  # the checksums cover the per-shard sums stored in each shard


def test_stats_after_resume_are_bitwise_equal_to_an_uninterrupted_write(tmp_path, backend):
    _check_resume_equals_uninterrupted(tmp_path, backend)


def test_empty_split_has_no_statistics(tmp_path, backend):
    write_cache(tmp_path / "c", backend, n_train=2, n_heldout=0)
    c = cache.open(tmp_path / "c")
    assert c.num_rows("heldout") == 0
    with pytest.raises(ValueError, match="split 'heldout'.*no rows"):
        c.stats("heldout", 0)


def test_non_finite_values_are_refused_with_a_clear_error(tmp_path, backend):
    w = new_writer(tmp_path / "c", backend, dtype="float16", shard_rows=4)
    x = torch.ones(4, 12)
    x[1, 3] = 1e6  # overflows float16
    acts = {L: x for L in LAYERS}
    tok = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="non-finite.*float16 max 65504"):
        w.append("train", chunk=0, offset=0, acts=acts, token_ids=tok, sequence=tok, position=tok, document=tok)
    w.close()
    assert cache.open(tmp_path / "c", allow_incomplete=True).num_rows("train") == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [7, 384])
def test_host_sums_depend_on_the_rows_alone_and_stay_within_the_formats_bound(dtype, d):
    from cache.stats import combine, host_row_sums

    g = torch.Generator().manual_seed(d)
    n = 12000  # at width 384, blocks of 5461 rows: two and a partial one
    x = torch.randn(n, d, generator=g) * 3 + 1
    x[:, 0] = 400 + torch.randn(n, generator=g)  # one massive dimension, as residual streams have
    x = x.to(dtype)
    cuts = [0, 1, 2, 513, 514, 5461, 5999, n]  # odd sizes: pieces start at any alignment, cross blocks
    pieces = [x[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    one = combine(*(t.numpy() for t in host_row_sums([[x]], n, d)), [[x]])[0]
    split = combine(*(t.numpy() for t in host_row_sums([pieces], n, d)), [pieces])[0]
    assert one.sum.tobytes() == split.sum.tobytes()
    assert (one.sumsq, one.sumnorm) == (split.sumsq, split.sumnorm)
    ref = x.double().numpy()
    norms = np.sqrt((ref ** 2).sum(axis=1))
    bound = 1e-6 * norms.mean()  # FORMAT.md 2
    assert np.abs(one.sum / n - ref.mean(axis=0)).max() <= bound
    assert abs(one.sumnorm / n - norms.mean()) <= bound
    assert abs(one.sumsq / n - (norms ** 2).mean()) <= 1e-6 * (norms ** 2).mean()


def test_values_whose_squares_pass_float32s_range_still_get_finite_statistics(tmp_path, backend):
    # bfloat16 holds values up to ~3e38: squares past ~3e38 and column sums past ~3.4e38 overflow
    # float32 (the block sums' type) but not float64: such rows are finite and must be stored, with
    # exact enough statistics.
    rows = torch.full((5, 4), 1e20).to(torch.bfloat16)
    rows[2, 1] = -3e25
    rows[:, 3] = 3e38  # five of them: a float32 column sum is inf
    w = cache.CacheWriter(tmp_path / "c", layers=[0], d_model=4, dtype="bfloat16", shard_rows=5, identity={"t": 1},
                          metadata={}, backend=backend)
    zeros = torch.zeros(5, dtype=torch.long)
    w.append("train", chunk=0, offset=0, acts={0: rows}, token_ids=zeros, sequence=torch.arange(5), position=zeros,
             document=zeros)
    w.finish()
    s = cache.open(tmp_path / "c").stats("train", 0)
    mean, msq, mnorm = _reference(rows)
    assert np.isfinite(msq) and abs(s.mean_sq_norm - msq) <= 1e-6 * msq
    assert abs(s.mean_norm - mnorm) <= 1e-6 * mnorm and np.abs(s.mean - mean).max() <= 1e-6 * mnorm


@pytest.mark.parametrize("case", ["massive first token", "tiny values"])
def test_row_norms_keep_the_contract_for_massive_and_for_tiny_activations(case):
    from cache.stats import combine, host_row_sums

    # An LM's first token carries a few entries thousands of times the others, and every sequence
    # repeats it: a float32 sum of its squares in sequence was 5e-6 off at d = 4096, in every such row.
    # Rows below ~1e-19 square to float32 subnormals or zero.
    g = torch.Generator().manual_seed(5)
    d, n = 4096, 1024
    x = torch.randn(n, d, generator=g)
    if case == "massive first token":
        bos = torch.randn(d, generator=g)
        bos[7], bos[100] = 3000.0, -800.0
        x[::128] = bos
    else:
        x = x * 3e-24
    x = x.to(torch.bfloat16)
    s = combine(*(t.numpy() for t in host_row_sums([[x]], n, d)), [[x]])[0]
    sq = (x.double().numpy() ** 2).sum(axis=1)
    assert abs(s.sumsq / n - sq.mean()) <= 1e-6 * sq.mean()
    assert abs(s.sumnorm / n - np.sqrt(sq).mean()) <= 1e-6 * np.sqrt(sq).mean()


def _spec_row_sums(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """host_row_sums' documented order, one scalar operation at a time (float32 / float64 scalars):
    an independent reading of the rule that the C kernel and its numpy twin both implement."""
    n, d = x.shape
    f32, f64 = np.float32, np.float64
    sq = np.zeros(n)
    for r in range(n):
        total = f64(0.0)
        for c in range(0, d, 128):
            chunk = [f32(v) for v in x[r, c:c + 128]] + [f32(0.0)] * max(0, c + 128 - d)
            lanes = [chunk[lane] * chunk[lane] for lane in range(16)]
            for g in range(1, 8):
                lanes = [lanes[lane] + chunk[g * 16 + lane] * chunk[g * 16 + lane] for lane in range(16)]
            while len(lanes) > 1:
                lanes = [lanes[2 * i] + lanes[2 * i + 1] for i in range(len(lanes) // 2)]
            total = total + f64(lanes[0])
        sq[r] = total
    sums = np.zeros(d)
    for a in range(0, n, 256):
        level = [x[r].astype(np.float32) for r in range(a, min(a + 256, n))]
        level += [np.full(d, -0.0, dtype=np.float32)] * (256 - len(level))
        while len(level) > 1:
            level = [level[2 * i] + level[2 * i + 1] for i in range(len(level) // 2)]
        sums = sums + level[0].astype(np.float64)
    return sums, sq


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_host_sums_follow_the_documented_order_bit_for_bit(dtype):
    from cache.stats import host_row_sums

    g = torch.Generator().manual_seed(3)
    n, d = 300, 130  # a full block of 256 rows and a partial one; a full chunk of 128 columns and 2 more
    x = (torch.randn(n, d, generator=g) * 5 + 2).to(dtype)
    x[7] = -0.0  # a row of negative zeros: its squares and its place in the tree are exact
    sums, sq = host_row_sums([[x[:100], x[100:]]], n, d)
    want_sums, want_sq = _spec_row_sums(x.float().numpy())
    assert sums[0].numpy().tobytes() == want_sums.tobytes()
    assert sq[0].numpy().tobytes() == want_sq.tobytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, d", [(1, 7), (255, 128), (257, 130), (5000, 384), (600, 2048)])
def test_the_c_kernel_and_its_numpy_twin_give_the_same_bits(dtype, n, d, monkeypatch):
    from cache import stats

    if stats._library() is None:
        pytest.skip("no C compiler: only the numpy twin runs here")
    g = torch.Generator().manual_seed(n + d)
    x = torch.randn(n, d, generator=g) * 4 + 1
    x[: n // 3, 0] = 3000.0  # massive entries
    x[n // 2] *= 1e-22  # a row the float32 squares lose: summed again in float64
    x = x.to(dtype)
    cuts = sorted({0, n, *(int(c) for c in torch.randint(0, n, (4,), generator=g))})
    pieces = [x[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    kernel = stats.host_row_sums([pieces, [x]], n, d)
    monkeypatch.setattr(stats, "_library", lambda: None)
    twin = stats.host_row_sums([pieces, [x]], n, d)
    for a, b in zip(kernel, twin, strict=True):
        assert a.numpy().tobytes() == b.numpy().tobytes()
    for t in kernel:  # layer 0 in pieces, layer 1 in one tensor: the same rows, the same bits
        assert t[0].numpy().tobytes() == t[1].numpy().tobytes()


def test_a_harvest_resumed_without_the_c_kernel_matches_an_uninterrupted_one(tmp_path, monkeypatch):
    from cache import stats

    if stats._library() is None:
        pytest.skip("no C compiler: both writes use the numpy twin")
    # the kill lands with the kernel; the resume runs where there is no compiler
    _check_resume_equals_uninterrupted(tmp_path, "safetensors", "bfloat16",
                                       lambda: monkeypatch.setattr(stats, "_library", lambda: None))


def test_host_sums_refuse_pieces_that_do_not_match_n_d_or_one_dtype():
    from cache.stats import host_row_sums

    x = torch.randn(3, 4)
    for layers, n, d in (([[x]], 2, 4), ([[x]], 3, 5), ([[x[:1], x[1:].to(torch.bfloat16)]], 3, 4)):
        with pytest.raises(ValueError, match="pieces must be CPU"):
            host_row_sums(layers, n, d)
