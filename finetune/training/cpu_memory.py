"""Freed memory kept for reuse in a CPU training process, instead of handed back to the OS and faulted in again.

glibc's malloc serves every block over 32 MB (its largest dynamic mmap threshold) with a fresh mapping and unmaps
it on free. A real-size step allocates activations of that size dozens of times (SigLIP's MLP at batch 8 is 100 MB
per layer), so each step zero-fills them again page by page, and the memory-bound operators around them (GELU,
copies) pay for it. Taking big blocks from the heap and never trimming it keeps most of them mapped between steps
(torch's aligned allocations still split some freed blocks): the real-size SmolVLA LoRA step at batch 8 runs 5.6%
faster (10.43 -> 9.85 s on the 2-core Intel Xeon, bench/vs_lerobot.py --system-malloc) for 0.2 GB more peak RSS.
jemalloc or tcmalloc through LD_PRELOAD do better still and override this.
"""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: trim only when 2 GB lie free at the heap's top


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse; False where the C library is not glibc or refused. Threads
    other than the main one may still map big blocks (their arenas fall back to mmap), which is harmless; but when an
    OpenMP thread holds the main arena's lock at the wrong moment, glibc can move the main thread to such an arena for
    good, and that process then gains nothing (3 of 8 short runs with 2 threads on a loaded machine; none with 1)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
