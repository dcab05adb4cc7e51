"""Host-side tuning of the serving process.

glibc serves allocations above its mmap threshold (128 KiB at start) with fresh ``mmap`` calls
and returns them to the kernel on free, so a CPU engine page-faults its large activations and
K/V gathers in again at every iteration. glibc raises the threshold by itself as such blocks are
freed, but only after paying for it: in a fresh process W1's full-batch decode iterations took
a median 316 ms instead of 183 ms until it had (docs/benchmarks.md). Setting the mmap threshold
to its ceiling (32 MiB) and a high trim threshold at start skips that ramp. The cost is that the
process keeps its peak heap instead of giving it back, which is what a serving process wants.
Set ``ORCA_TUNE_MALLOC=0`` to leave malloc alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

from orca_compile import env

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit
_done = False


def tune_malloc() -> bool:
    """Keep freed large blocks for reuse (glibc only); returns whether anything was changed."""
    global _done
    if _done:
        return True
    if not env.get().tune_malloc or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = all(mallopt(opt, value) == 1 for opt, value in (
        (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20)))
    _done = ok
    return ok
