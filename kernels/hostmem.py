"""Host memory for the CPU kernels' large operands: tensors on transparent huge pages.

A CPU engine streams its packed weights (497 MB for GPT-2 small) and its paged K/V cache from DRAM
at every iteration. On 4 KiB pages that is one TLB entry per 64 cache lines, and on a virtual
machine every TLB miss is a two-level page walk. ``empty`` maps the memory itself (anonymous
``mmap``, aligned to 2 MiB) and asks the kernel for huge pages with ``madvise(MADV_HUGEPAGE)``
before the first touch, which works where ``/sys/kernel/mm/transparent_hugepage/enabled`` says
``madvise`` (the common default) as well as ``always``. On GPT-2 small's 49 GEMMs the C GEMM took
0.95-0.98x the time at 1-16 rows and 0.99-1.00x at 32-512 (docs/benchmarks.md).

Falls back to ``torch.empty`` for small tensors, off Linux, without ``MADV_HUGEPAGE``, or with
``ORCA_HUGE_PAGES=0``. The memory lives as long as the tensor (and its views): the tensor holds
the mapping, which is unmapped when the last reference goes.
"""
from __future__ import annotations

import math
import mmap
import sys

import torch

from orca_compile import env

HUGE_PAGE = 2 << 20
MIN_BYTES = HUGE_PAGE  # below one huge page there is nothing to gain


def enabled() -> bool:
    return (env.get().huge_pages and sys.platform.startswith("linux")
            and hasattr(mmap, "MADV_HUGEPAGE"))


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor, on huge pages where they can be had."""
    shape = tuple(shape)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes < MIN_BYTES or not enabled():
        return torch.empty(shape, dtype=dtype)
    try:
        region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        region.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError):
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(region, dtype=torch.uint8)  # holds `region` until the last view is gone
    offset = -raw.data_ptr() % HUGE_PAGE
    return raw[offset:offset + nbytes].view(dtype).view(shape)


def zeros(shape, dtype: torch.dtype) -> torch.Tensor:
    return empty(shape, dtype).zero_()
