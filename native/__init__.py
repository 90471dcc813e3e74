"""Compile and load small C libraries on first use, cached on disk per machine: the one owner of how
our C kernels are built (`sae/native`: the SAE step's top-k and decode gradient; `cache/stats.c`: the
writer's statistics).

A library is built by the host's C compiler with -O3 -march=native, so a binary is only reused on a
CPU with the same features: the cache key holds the sources, the compiler's version, the flags and
the CPU's feature list (a home directory shared by cluster nodes of different CPUs gets one library
per kind). A build writes a temporary file and renames it into place, so processes that build at
once (the ranks of a data-parallel run) never load a half-written library. No build step at install
time; where there is no compiler, or the build or the load fails, or SAECACHE_NATIVE=0, `load`
returns None with one warning and callers keep their Python paths.

`native.heap` sets the other native thing a run depends on: glibc's thresholds for returning freed
memory, which the trainer raises. This package imports nothing of ours, so that every other one may
use it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

DISABLE_ENV = "SAECACHE_NATIVE"
DIR_ENV = "SAECACHE_NATIVE_DIR"
# One build at a time in this process: threads that need a library first (the cache writer's) then wait
# for it and load the file it made, instead of each compiling it again.
_BUILDING = threading.Lock()


def disabled() -> bool:
    """SAECACHE_NATIVE=0 (or false / no / off): every library is None."""
    return os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off")


def cache_dir() -> Path:
    """Where built libraries live: $SAECACHE_NATIVE_DIR, else $XDG_CACHE_HOME/saecache/native
    (~/.cache/saecache/native)."""
    if os.environ.get(DIR_ENV):
        return Path(os.environ[DIR_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "saecache" / "native"


def compiler() -> list[str] | None:
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


def _key(cc: list[str], sources: Sequence[Path], flag_sets: Sequence[Sequence[str]]) -> str:
    h = hashlib.sha256()
    for src in sources:
        h.update(src.read_bytes())
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    for part in (version, " | ".join(" ".join(f) for f in flag_sets), _cpu_features(), platform.machine()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def build(name: str, sources: Sequence[Path], headers: Sequence[Path], flag_sets: Sequence[Sequence[str]],
          out_dir: Path | None = None, force: bool = False) -> Path:
    """The path of lib{name}-{key}.so, compiling `sources` first if this machine's build is not cached
    (or `force`). flag_sets: compiler flags to try in turn (the first that compiles wins, e.g. with and
    then without OpenMP). Raises RuntimeError (with the compiler's message) when none compiles."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
    out_dir = out_dir or cache_dir()
    target = out_dir / f"lib{name}-{_key(cc, [*sources, *headers], flag_sets)}.so"
    if target.exists() and not force:
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out_dir, name)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=out_dir)
    os.close(fd)
    try:
        for flags in flag_sets:
            done = subprocess.run([*cc, *flags, "-fPIC", "-shared", "-o", tmp, *map(str, sources)],
                                  capture_output=True, text=True, timeout=300)
            if done.returncode == 0:
                break
        else:
            raise RuntimeError(f"{' '.join(cc)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o755)  # mkstemp's 0600 would keep other users of a shared cache directory out
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _remove_stale_temporaries(out_dir: Path, name: str, age_s: float = 3600.0) -> None:
    """Temporary files of builds killed mid-compile (a live build finishes within its 300 s timeout)."""
    now = time.time()
    for tmp in out_dir.glob(f"lib{name}-*.tmp"):
        try:
            if now - tmp.stat().st_mtime > age_s:
                tmp.unlink()
        except OSError:
            pass


def load(what: str, build_fn: Callable[..., Path], bind: Callable[[Path], ctypes.CDLL]) -> ctypes.CDLL | None:
    """bind(build_fn()) (bind: ctypes.CDLL with the functions' signatures set; OSError or AttributeError
    if the file is not the library it should be), or None with one warning naming why. A cached library
    that does not load is rebuilt once (build_fn(force=True))."""
    if disabled():
        return None
    with _BUILDING:
        return _load(what, build_fn, bind)


def _load(what: str, build_fn: Callable[..., Path], bind: Callable[[Path], ctypes.CDLL]) -> ctypes.CDLL | None:
    try:
        try:
            return bind(build_fn())
        except (OSError, AttributeError):
            # A truncated file fails dlopen and reloads once rebuilt; a foreign library that did load
            # stays mapped under that name in this process (dlopen returns it again), so this process
            # falls back and the next one loads the rebuilt file.
            return bind(build_fn(force=True))
    except (OSError, AttributeError, RuntimeError, subprocess.SubprocessError) as e:
        warnings.warn(f"{what}: C kernels unavailable, using the Python path ({e}); set {DISABLE_ENV}=0 to "
                      "silence", RuntimeWarning, stacklevel=4)
        return None
