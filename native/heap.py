"""The C heap of a harvest or a training run: the memory one batch frees is kept for the next.

A training step, or a harvest batch, allocates and frees the same large blocks every time: the
encoder's pre-activations, the [B, d] temporaries of the loss, the weight gradients; the model's
hidden states and the rows copied out of them. glibc serves blocks above its mmap threshold (dynamic,
from 128 KiB up to 32 MiB) with fresh mappings, unmaps them on free, and hands freed memory at the
top of the heap back to the OS above its trim threshold, so every step faults the same pages in
again and the kernel zeroes them. Measured (bench/RESULTS.md, "The heap"): a quarter of the trainer's
TopK step at 12,288 latents in bf16, a fifth at 3072 in float32; the MiniLM forward of the default
harvest ran 1.14x with the thresholds raised. With both raised, those blocks come from the heap and
stay there between batches: the process keeps up to `RETAIN_BYTES` of freed memory instead of
returning it.

glibc only (elsewhere, or with another malloc preloaded, it changes nothing), and never over the
user's own setting: with MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ in the environment it
leaves glibc alone.
"""

from __future__ import annotations

import ctypes
import functools
import os

RETAIN_BYTES = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


@functools.cache
def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds to RETAIN_BYTES for this process (once); whether they
    were raised (False: not glibc, or the user set either threshold)."""
    if any(name in os.environ for name in USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own malloc: glibc's where it has one
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, RETAIN_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, RETAIN_BYTES))
