"""The build of `sae.native`'s library (the compile-and-cache rules are `native`'s)."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import native
from native import DIR_ENV, DISABLE_ENV  # noqa: F401  (the names callers and tests set)

_HERE = Path(__file__).parent
NAME = "sae_native"
SOURCES = tuple(_HERE / name for name in ("parallel.c", "row_topk.c", "sparse_decode.c"))
HEADERS = (_HERE / "parallel.h",)
# -fopenmp-simd: the dot products' `omp simd reduction` vectorises without -ffast-math's licence elsewhere
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-pthread")
# tried first: the kernels then share torch's OpenMP threads (parallel.c says why)
OPENMP = "-fopenmp"


def build(out_dir: Path | None = None, force: bool = False) -> Path:
    """The library's path, compiling it first if this machine's build is not cached (or `force`): with
    OpenMP, else with threads of its own. Raises RuntimeError (with the compiler's message) when it
    cannot be built."""
    return native.build(NAME, SOURCES, HEADERS, [(*FLAGS, OPENMP), FLAGS], out_dir, force)


def _load(path: Path) -> ctypes.CDLL:
    """The library at path with its functions' signatures; OSError or AttributeError if it is not ours
    (a file of another build or a truncated one under the cache's name)."""
    lib = ctypes.CDLL(str(path))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.sae_row_topk.argtypes = [ptr, ctypes.c_int, i64, i64, i64, i64, i64, ptr, ptr, ptr, ctypes.c_int]
    lib.sae_row_topk.restype = ctypes.c_int
    lib.sae_gather_dot.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, ptr, ctypes.c_int]
    lib.sae_gather_dot.restype = ctypes.c_int
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (SAECACHE_NATIVE=0, or the build or the load failed: one warning
    names why, and callers keep their torch paths). A cached library that does not load is rebuilt once."""
    return native.load("sae.native", build, _load)
