"""The C top-k kernel (sae/native) against torch.topk, and its build: cached per machine, never a
half-written library, a clear fallback when it cannot be built."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import native as native_build
from sae import native
from sae.native import build
from sae.selection import row_topk

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler: sae.native falls back to torch")


def _check(z: torch.Tensor, k: int) -> None:
    got = native.row_topk(z, k)
    assert got is not None
    values, idx = got
    assert values.dtype == z.dtype and idx.dtype == torch.int64 and idx.shape == (z.shape[0], k)
    ref = z.float().topk(k, dim=1).values  # independent: torch's sorted top-k values
    assert torch.equal(values.float().sort(dim=1, descending=True).values, ref)
    assert torch.equal(z.gather(1, idx), values)  # the values are those at the indices
    assert (idx.sort(dim=1).values.diff(dim=1) > 0).all()  # each entry at most once


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k", [(3072, 32), (12288, 64), (1000, 7), (3001, 32), (64, 64), (129, 1), (40, 33)])
def test_exact_on_random_rows(dtype, m, k):
    torch.manual_seed(m * 7 + k)
    _check(torch.randn(23, m).to(dtype) * 3, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_with_ties_signed_zeros_infinities_and_sorted_rows(dtype):
    torch.manual_seed(1)
    m, k = 3001, 32  # 3001 is prime: the last columns are a tail no block covers
    z = torch.randint(0, 20, (12, m)).to(dtype)
    z[0] = 5.0  # a constant row
    z[1, :100] = 30.0  # more ties at the maximum than k
    z[2, -3:] = 40.0  # winners in the tail
    z[3] = torch.linspace(-1, 1, m).to(dtype)  # increasing; bf16 rounds runs of them to one value
    z[4] = -torch.arange(m).to(dtype)  # decreasing, all negative
    z[5] = 0.0
    z[5, ::2] = -0.0  # -0 and +0 are equal values
    z[6, 10:20] = float("inf")
    z[7] = float("-inf")
    z[7, 500] = 1.0
    z[8, ::188] = 99.0  # exactly one winner in many blocks
    z[9] = torch.randn(m).abs().mul(1e-39).to(dtype)  # denormal values
    _check(z, k)
    _check(z, 1)
    _check(z, m)  # k = M: the whole row


def test_nan_gives_none_and_row_topk_keeps_torchs_rule():
    z = torch.randn(5, 2048)
    z[3, 1000] = float("nan")
    assert native.row_topk(z, 8) is None
    z[3, 1000] = 0.0
    z[3, 2047] = float("nan")  # in the last column (a block maximum's last candidate)
    assert native.row_topk(z, 8) is None
    values, idx = row_topk(z, 8)  # the torch path: NaN ranks first
    assert 2047 in idx[3].tolist()


def test_strided_rows_transposes_and_unsupported_inputs():
    torch.manual_seed(2)
    big = torch.randn(10, 5000)
    _check(big[:, 100:3100], 16)  # rows 5000 apart: a view, not copied
    _check(torch.randn(3000, 10).t(), 16)  # column-major: made contiguous first
    _check(torch.randn(4, 300, requires_grad=True).detach(), 5)
    assert native.row_topk(torch.randn(4, 300, dtype=torch.float64), 5) is None  # not float32 / bf16
    assert native.row_topk(torch.randn(4, 300), 301) is None  # k > M
    assert native.row_topk(torch.randn(2, 3, 300), 5) is None  # not a matrix
    values, idx = native.row_topk(torch.randn(0, 300), 5)
    assert values.shape == (0, 5) and idx.shape == (0, 5)


def test_the_same_result_whatever_the_thread_count():
    torch.manual_seed(3)
    z = torch.randint(0, 50, (64, 3072)).float()  # ties, so the tie-break shows
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.row_topk(z, 32)
        torch.set_num_threads(2)
        two = native.row_topk(z, 32)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[1], two[1])


def test_gather_dot_matches_its_definition_with_empty_and_uneven_rows():
    torch.manual_seed(4)
    b, m, d = 9, 50, 37  # d not a multiple of a vector's width
    grad, w = torch.randn(b, d), torch.randn(m, d)
    counts = torch.tensor([3, 0, 5, 1, 0, 0, 7, 2, 4])  # rows with no entry, the last with some
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)[:-1]])
    cols = torch.randint(0, m, (int(counts.sum()),))
    rows = torch.arange(b).repeat_interleave(counts)
    ref = torch.stack([grad[r].double() @ w[c].double() for r, c in zip(rows.tolist(), cols.tolist(), strict=True)])
    got = native.gather_dot(grad, w, cols, offsets)
    assert got.dtype == torch.float32 and torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(native.gather_dot(grad.t().contiguous().t(), w, cols, offsets), got)  # any layout
    assert native.gather_dot(grad.double(), w.double(), cols, offsets) is None  # float32 only
    bad = cols.clone()
    bad[5] = m
    with pytest.raises(ValueError, match="column index"):
        native.gather_dot(grad, w, bad, offsets)
    with pytest.raises(ValueError, match="non-decreasing"):
        native.gather_dot(grad, w, cols, offsets.flip(0))
    with pytest.raises(ValueError, match="start at 0"):
        native.gather_dot(grad, w, cols, offsets + 1)  # entry 0 would belong to no row
    with pytest.raises(ValueError, match="1-D integer"):
        native.gather_dot(grad, w, cols.float(), offsets)
    with pytest.raises(ValueError, match="one entry per row"):
        native.gather_dot(grad, w, cols, offsets[:-1])


def test_block_width_keeps_at_least_k_blocks():
    assert native.block_width(3072, 32) == 8  # about sqrt(3072 / 32) = 9.8
    assert native.block_width(65536, 32) == 16  # capped
    assert native.block_width(64, 64) == 1
    for m, k in [(100, 30), (3001, 32), (4096, 1024)]:
        assert m // native.block_width(m, k) >= k


def test_build_is_cached_and_reused(tmp_path):
    first = build.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert build.build(tmp_path) == first and first.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary file left behind


def test_a_failed_build_warns_once_and_everything_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    (tmp_path / "no-such-compiler").write_text("#!/bin/sh\necho 'cc: broken' >&2\nexit 3\n")
    os.chmod(tmp_path / "no-such-compiler", 0o755)
    monkeypatch.setenv(build.DIR_ENV, str(tmp_path / "lib"))
    build.library.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="broken"):
            build.build()
        with pytest.warns(RuntimeWarning, match="C kernels unavailable"):
            assert build.library() is None
        z = torch.randn(6, 3072)
        assert native.row_topk(z, 32) is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning
            values, idx = row_topk(z, 32)  # the torch path, still exact
        assert torch.equal(values.sort(dim=1).values, z.topk(32, dim=1).values.sort(dim=1).values)
        assert not any(p.suffix == ".tmp" for p in (tmp_path / "lib").iterdir())
    finally:
        build.library.cache_clear()


def test_a_foreign_or_truncated_library_under_the_cache_name_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv(build.DIR_ENV, str(tmp_path))
    target = build.build(tmp_path)
    src = tmp_path / "other.c"
    src.write_text("int not_ours(void) { return 1; }\n")
    subprocess.run([*native_build.compiler(), "-shared", "-fPIC", "-o", str(target), str(src)], check=True)
    build.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="sae_row_topk"):
            assert build.library() is None  # this process has the foreign one mapped: it falls back
        check = "from sae.native import build, row_topk; import torch; assert build.library() is not None; " \
                "assert row_topk(torch.randn(3, 300), 4) is not None"
        env = {**os.environ, build.DIR_ENV: str(tmp_path), "PYTHONPATH": str(ROOT)}
        # the next process loads the rebuilt one
        subprocess.run([sys.executable, "-W", "error", "-c", check], check=True, env=env)
        target.write_bytes(target.read_bytes()[:100])  # truncated: dlopen fails, rebuilt and loaded at once
        subprocess.run([sys.executable, "-W", "error", "-c", check], check=True, env=env)
    finally:
        build.library.cache_clear()


def test_cc_may_carry_arguments_and_the_library_is_readable_by_all(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "env cc")  # a wrapper and its argument, as in CC="ccache gcc"
    target = build.build(tmp_path)
    assert target.stat().st_mode & 0o777 == 0o755  # a shared cache directory serves every user
    old = tmp_path / "libsae_native-dead.so.x1.tmp"  # left by a build killed mid-compile, long ago
    old.write_bytes(b"")
    os.utime(old, (0, 0))
    build.build(tmp_path, force=True)
    assert not old.exists()


def test_without_openmp_the_kernels_use_threads_of_their_own(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "OPENMP", "-fno-such-openmp-flag")  # the OpenMP build fails: the fallback
    lib = build._load(build.build(tmp_path))
    monkeypatch.setattr(native, "library", lambda: lib)
    torch.manual_seed(5)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        _check(torch.randn(300, 3072), 32)  # enough rows and columns for two threads
    finally:
        torch.set_num_threads(before)


def test_native_can_be_switched_off(monkeypatch):
    monkeypatch.setenv(build.DISABLE_ENV, "0")
    build.library.cache_clear()
    try:
        assert build.library() is None
    finally:
        build.library.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k", [(3072, 32), (3001, 7), (40, 33)])
def test_the_bias_is_added_before_the_search_and_the_kept_sums_rounded_to_zs_dtype(dtype, m, k):
    torch.manual_seed(m + k)
    z = (torch.randn(19, m) * 2).to(dtype)
    bias = torch.randn(m) * 3  # large against z: the search without it would keep other columns
    summed = (z.float() + bias).to(dtype)  # the definition: a float32 sum, rounded once to z's dtype
    values, idx = native.row_topk(z, k, bias)
    assert values.dtype == dtype
    assert torch.equal(summed.gather(1, idx), values)  # the kept values are the rounded sums
    ref = summed.float().topk(k, dim=1).values  # independent: torch's top-k of the rounded sums
    assert torch.equal(values.float().sort(dim=1, descending=True).values, ref)
    assert (idx.sort(dim=1).values.diff(dim=1) > 0).all()
    out = torch.empty(19, k, dtype=dtype), torch.empty(19, k, dtype=torch.int64)
    assert native.row_topk(z, k, bias, out=out)[0] is out[0]  # written into the caller's tensors
    assert torch.equal(out[0], values) and torch.equal(out[1], idx)


def test_a_bias_of_the_wrong_length_or_an_unfit_out_is_refused():
    z = torch.randn(4, 300)
    with pytest.raises(ValueError, match="bias must be a CPU vector of the 300 columns"):
        native.row_topk(z, 5, torch.zeros(299))
    with pytest.raises(ValueError, match=r"out must be contiguous \[4, 5\] tensors of torch.float32 and int64"):
        native.row_topk(z, 5, out=(torch.empty(4, 5, dtype=torch.bfloat16), torch.empty(4, 5, dtype=torch.int64)))
    with pytest.raises(ValueError, match="out must be contiguous"):
        native.row_topk(z, 5, out=(torch.empty(5, 4).t(), torch.empty(4, 5, dtype=torch.int64)))


def test_nan_in_the_sum_falls_back_to_torch():
    z = torch.randn(3, 300)
    bias = torch.zeros(300)
    bias[7] = float("nan")
    assert native.row_topk(z, 5, bias) is None
