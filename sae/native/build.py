"""Compile and load the C kernels of `sae.native` (once per process, cached on disk per machine).

The library is built with -O3 -march=native, so a binary is only reused on a CPU with the same
features: the cache key holds the source, the compiler's version, the flags and the CPU's feature
list (a home directory shared by cluster nodes of different CPUs gets one library per kind). A build
writes a temporary file and renames it into place, so processes that build at once (the ranks of a
data-parallel run) never load a half-written library.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

_HERE = Path(__file__).parent
SOURCES = tuple(_HERE / name for name in ("parallel.c", "row_topk.c", "sparse_decode.c"))
HEADERS = (_HERE / "parallel.h",)
# -fopenmp-simd: the dot products' `omp simd reduction` vectorises without -ffast-math's licence elsewhere
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fPIC", "-shared", "-pthread")
# tried first: the kernels then share torch's OpenMP threads (parallel.c says why)
OPENMP = "-fopenmp"
DISABLE_ENV = "SAECACHE_NATIVE"
DIR_ENV = "SAECACHE_NATIVE_DIR"


def cache_dir() -> Path:
    """Where built libraries live: $SAECACHE_NATIVE_DIR, else $XDG_CACHE_HOME/saecache/native
    (~/.cache/saecache/native)."""
    if os.environ.get(DIR_ENV):
        return Path(os.environ[DIR_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "saecache" / "native"


def _compiler() -> list[str] | None:
    """The compiler's command line: $CC (which may carry arguments, e.g. "ccache gcc"), else cc, gcc, clang."""
    if os.environ.get("CC", "").strip():
        return shlex.split(os.environ["CC"])
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return [found] if found else None


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _key(cc: list[str]) -> str:
    h = hashlib.sha256()
    for src in (*SOURCES, *HEADERS):
        h.update(src.read_bytes())
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    for part in (version, " ".join((*FLAGS, OPENMP)), _cpu_features(), platform.machine()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def build(out_dir: Path | None = None, force: bool = False) -> Path:
    """The library's path, compiling it first if this machine's build is not cached (or `force`).
    Raises RuntimeError (with the compiler's message) when it cannot be built."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
    out_dir = out_dir or cache_dir()
    target = out_dir / f"libsae_native-{_key(cc)}.so"
    if target.exists() and not force:
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out_dir)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=out_dir)
    os.close(fd)
    try:
        done = subprocess.run([*cc, *FLAGS, OPENMP, "-o", tmp, *map(str, SOURCES)], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:  # no OpenMP runtime to link: threads of its own (parallel.c)
            done = subprocess.run([*cc, *FLAGS, "-o", tmp, *map(str, SOURCES)], capture_output=True, text=True,
                                  timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cc)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o755)  # mkstemp's 0600 would keep other users of a shared cache directory out
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _remove_stale_temporaries(out_dir: Path, age_s: float = 3600.0) -> None:
    """Temporary files of builds killed mid-compile (a live build finishes within its 300 s timeout)."""
    now = time.time()
    for tmp in out_dir.glob("libsae_native-*.tmp"):
        try:
            if now - tmp.stat().st_mtime > age_s:
                tmp.unlink()
        except OSError:
            pass


def _load(path: Path) -> ctypes.CDLL:
    """The library at path with its functions' signatures; OSError or AttributeError if it is not ours
    (a file of another build or a truncated one under the cache's name)."""
    lib = ctypes.CDLL(str(path))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.sae_row_topk.argtypes = [ptr, ctypes.c_int, i64, i64, i64, i64, i64, ptr, ptr, ctypes.c_int]
    lib.sae_row_topk.restype = ctypes.c_int
    lib.sae_gather_dot.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, ptr, ctypes.c_int]
    lib.sae_gather_dot.restype = ctypes.c_int
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (SAECACHE_NATIVE=0, or the build or the load failed: one warning
    names why, and callers keep their torch paths). A cached library that does not load is rebuilt once."""
    if os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:
        try:
            return _load(build())
        except (OSError, AttributeError):
            # A truncated file fails dlopen and reloads once rebuilt; a foreign library that did load
            # stays mapped under that name in this process (dlopen returns it again), so this process
            # falls back and the next one loads the rebuilt file.
            return _load(build(force=True))
    except (OSError, AttributeError, RuntimeError, subprocess.SubprocessError) as e:
        warnings.warn(f"sae.native: C kernels unavailable, using torch's ({e}); set {DISABLE_ENV}=0 to silence",
                      RuntimeWarning, stacklevel=2)
        return None
