"""How the C allocator treats the host memory of training (glibc's malloc on Linux).

A small model's training step on a CPU allocates and frees activations of a few MB each. glibc serves blocks above
its mmap threshold (128 kB at start, raised only by frees of bigger blocks) with fresh `mmap`s and gives them back
at every `free`, so the next step page-faults the same megabytes in again, zero-filled by the kernel. On the
embedded default that is ~10 % of a training step and ~25 % of an evaluation, and it depends on what ran before
(after testing in batches of 64 a step was slower than after batches of 128). Keeping freed blocks in the heap for
reuse removes it, at the price of the process keeping its peak heap until it exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("makd.train")

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed on 64-bit: blocks under 32 MB come from the heap
TRIM_THRESHOLD = 1 << 30  # free memory at the heap's top is returned to the system above 1 GB only


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks for reuse (process-wide, for the rest of the process). False where the C
    library is not glibc (macOS, musl), which keeps its own behaviour."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        log.debug("train.keep_freed_memory: no glibc mallopt here; the allocator is left as it is")
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
