"""One entry point per op; picks the implementation for the device at hand.

Today every device takes the torch reference; Triton kernels for CUDA plug in here.
"""
from __future__ import annotations

from orca_compile.kernels import attention_ref


def attention(*args):
    return attention_ref.attention(*args)
