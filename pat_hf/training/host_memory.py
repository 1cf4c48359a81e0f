"""Keep freed host memory for reuse instead of handing it back to the OS after every step.

glibc serves blocks above its mmap threshold with fresh mappings and trims the heap top when freed, so on the
CPU every step's large tensors (activations, and the gradients that zero_grad(set_to_none=True) drops) come
back as new pages that the kernel faults in and zeroes again (a sizeable share of a CPU step: README.md, Performance). A
32 MiB mmap threshold (glibc's largest) and a 1 GiB trim threshold keep them in the heap. Other C libraries,
and platforms without glibc, are left as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 1024 * 1024 * 1024


def keep_freed_host_memory() -> bool:
    """Tune glibc's allocator for this process; True where it was tuned."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD,
                                                                                   TRIM_THRESHOLD_BYTES))
