"""The C heap of a training run: the memory one step frees is reused by the next.

A training step allocates and frees the same large blocks every time: the encoder's pre-activations,
the [B, d] temporaries of the loss, the weight gradients. glibc serves blocks above its mmap threshold
(dynamic, from 128 KiB up to 32 MiB) with fresh mappings, unmaps them on free, and hands freed memory
at the top of the heap back to the OS above its trim threshold, so every step faults the same pages
in again and the kernel zeroes them. Measured (bench/RESULTS.md, "The heap"): a quarter of the
trainer's TopK step at 12,288 latents in bf16, a fifth at 3072 in float32. (A harvest-only process
gained nothing from it, so the harvest leaves glibc alone.)

With both thresholds at `RETAIN_BYTES`, blocks below that size come from the heap and stay there:
freed memory is reused rather than returned, so the process's resident memory stays near its peak
(freed blocks below live ones were never returned anyway; now larger ones join them). A freed block
is not always reused at once (torch asks for 64-byte-aligned memory, which a hole of exactly the
block's size cannot serve), so the heap grows for the first steps and then holds: at 12,288 latents in
bf16, 559 MB resident after step 1, 598 MB from step 40 to step 80 (glibc's defaults: 535-601 MB).
Blocks above `RETAIN_BYTES` are still mapped and unmapped as before. Set it after the model is built,
whose large temporaries would otherwise stay resident as holes in the heap.

Linux with glibc only (elsewhere it changes nothing and says so), and never over the user's own
setting: with MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ in the environment it leaves glibc
alone. With another malloc preloaded (jemalloc, tcmalloc) glibc's thresholds are set but unused.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

RETAIN_BYTES = 256 << 20
# Some glibc versions refuse an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit): then this.
FALLBACK_BYTES = 32 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


@functools.cache
def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); whether both were raised (False:
    not Linux with glibc, or the user set either threshold, or glibc refused)."""
    if any(name in os.environ for name in USER_SETTINGS):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own malloc: glibc's here
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, RETAIN_BYTES) or mallopt(param, FALLBACK_BYTES)
               for param in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD))
