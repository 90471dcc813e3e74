"""native/heap.py: after `retain_freed_memory`, large blocks come from the heap and are not unmapped."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Where a 64 MiB tensor's memory lies (in the process's [heap], the brk area, or in a mapping of its
# own, which glibc's defaults give every block above 32 MiB and unmap on free), and how many minor
# page faults a second block of that size costs after the first is freed.
CHILD = """
import resource, sys
import torch
sys.path.insert(0, {root!r})
from native.heap import retain_freed_memory
print("applied", retain_freed_memory() if {retain} else None)
def in_heap(ptr):
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
            if lo <= ptr < hi:
                return True
    return False
t = torch.empty(16 << 20, dtype=torch.float32).fill_(1.0)
print("heap", in_heap(t.data_ptr()))
del t
"""


def _child(retain: bool, env: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | (env or {})
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), retain=retain)], env=env,
                         capture_output=True, text=True, check=True).stdout
    return dict(line.split() for line in out.strip().splitlines())


glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")


@glibc
def test_a_large_block_comes_from_the_heap_once_retained_and_from_a_mapping_of_its_own_before():
    retained, default = _child(retain=True), _child(retain=False)
    assert retained == {"applied": "True", "heap": "True"}
    assert default["heap"] == "False"  # the check can tell the two apart


@glibc
def test_the_users_own_malloc_settings_are_left_alone():
    got = _child(retain=True, env={"MALLOC_TRIM_THRESHOLD_": "131072"})
    assert got == {"applied": "False", "heap": "False"}


def test_nothing_is_set_off_glibc(monkeypatch):
    import native.heap as heap

    heap.retain_freed_memory.cache_clear()
    monkeypatch.setattr(heap.platform, "system", lambda: "Windows")
    try:
        assert heap.retain_freed_memory() is False
    finally:
        heap.retain_freed_memory.cache_clear()
