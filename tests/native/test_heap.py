"""native/heap.py: after `retain_freed_memory`, a freed large block is reused without page faults."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Allocates, touches and frees a 64 MiB block twice and prints the minor page faults of the second
# round: with glibc's defaults the block is a fresh mapping each time (about 16k faults of 4 KiB pages).
CHILD = """
import resource, sys
import torch
sys.path.insert(0, {root!r})
from native.heap import retain_freed_memory
print("applied", retain_freed_memory() if {retain} else None)
def round_trip():
    t = torch.empty(16 << 20, dtype=torch.float32)
    t.fill_(1.0)
    del t
round_trip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_trip()
print("faults", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(retain: bool, env: dict[str, str] | None = None) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | (env or {})
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), retain=retain)], env=env,
                         capture_output=True, text=True, check=True).stdout.split("\n")
    return out[0].split()[1], int(out[1].split()[1])


glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")


@glibc
def test_a_freed_block_comes_back_without_page_faults_once_retained():
    applied, retained = _faults(retain=True)
    _, default = _faults(retain=False)
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert applied == "True"
    assert default > pages // 2  # the baseline faults the block in again: the check can tell the two apart
    assert retained < pages // 20


@glibc
def test_the_users_own_malloc_settings_are_left_alone():
    applied, faults = _faults(retain=True, env={"MALLOC_TRIM_THRESHOLD_": "131072"})
    assert applied == "False"
    assert faults > (64 << 20) // os.sysconf("SC_PAGE_SIZE") // 2
