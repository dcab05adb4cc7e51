"""Greedy decoding's argmax on the CPU in C (``cpu_argmax.c``): ``logits.argmax(dim=-1)`` in one
vectorised pass per thread's rows (torch.argmax took 0.9 ms on W1's [32, 50257] logits, ~0.1 ms
here), the same answer: each row's first maximum, or its first NaN.

``runtime/sampler.py`` calls ``argmax`` for the greedy rows of a batch and keeps torch's where it
returns None. Built and loaded by ``cbuild`` like the other C kernels: ``available()`` is False
(and ``why_unavailable()`` says why) without a C compiler or with ``ORCA_CPU_KERNELS=0``.
"""
from __future__ import annotations

import ctypes

import torch

from orca_compile.kernels import cbuild

DTYPES = {torch.float32: 0, torch.float64: 1}


def _declare(lib):
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn = lib.orca_argmax
    fn.argtypes = [ctypes.c_int, ptr, i64, i64, i64, ptr, ctypes.c_int]
    fn.restype = ctypes.c_int


LIB = cbuild.CLibrary("cpu_argmax.c", _declare)


available, why_unavailable = LIB.available, LIB.why_unavailable  # built and loaded at first call


def argmax(logits: torch.Tensor) -> torch.Tensor | None:
    """``logits.argmax(dim=-1)`` for a 2-D float32/float64 CPU tensor with unit column stride (the
    first maximum of each row, or its first NaN: torch's answer), in one vectorised pass; None where
    the kernel does not apply (other dtypes or layouts, or no C library), so callers keep torch's."""
    lib = LIB.load()
    if (lib is None or logits.dim() != 2 or logits.dtype not in DTYPES or logits.device.type != "cpu"
            or logits.shape[1] == 0 or (logits.stride(1) != 1 and logits.shape[1] > 1)):
        return None
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    if lib.orca_argmax(DTYPES[logits.dtype], logits.data_ptr(), logits.stride(0), logits.shape[0], logits.shape[1],
                       out.data_ptr(), torch.get_num_threads()) != 0:
        return None
    return out
