"""Rotary position embedding on the CPU in C (``cpu_rope.c``): HF's ``q * cos + rotate_half(q) * sin``
in one call instead of seven ATen ops, float32 and float64.

``passes/fuse_rope.py`` (run by ``lower_cpu`` with ``kernel="orca"``) calls ``rotate`` for the
query and the key of every layer of a Llama-style model (Llama, Qwen2, Mistral, Gemma2; the
rotated part of GPT-NeoX's partial rotary).

Built and loaded by ``cbuild`` like the other C kernels: ``available()`` is False (and
``why_unavailable()`` says why) without a C compiler or with ``ORCA_CPU_KERNELS=0``.
"""
from __future__ import annotations

import ctypes

import torch

from orca_compile.kernels import cbuild

DTYPES = {torch.float32: 0, torch.float64: 1}


def _declare(lib):
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn = lib.orca_rope
    fn.argtypes = [ctypes.c_int, ptr, i64, i64, i64, i64, i64, ptr, i64, ptr, i64, ptr, i64, i64]
    fn.restype = ctypes.c_int


LIB = cbuild.CLibrary("cpu_rope.c", _declare)


available, why_unavailable = LIB.available, LIB.why_unavailable  # built and loaded at first call


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + cat(-x2, x1, -1) * sin`` with ``x1, x2`` the halves of ``x``'s last dim: ``x``
    ``[H, T, D]`` (any strides), ``cos``, ``sin`` ``[T, D]`` or ``[1, T, D]`` (broadcast over
    ``H``), one dtype. Returns a new ``[H, T, D]`` tensor laid out as ``x`` (``torch.empty_like``),
    as ATen's ``add`` would leave it: for the view of a ``[T, H * D]`` projection, ``[T, H, D]``
    rows, so the transpose in front of attention is contiguous again."""
    lib = LIB._lib or LIB.load()
    if lib is None:
        raise RuntimeError(f"the C RoPE kernel is unavailable: {LIB.why_unavailable()}")
    if (x.dim() != 3 or x.dtype not in DTYPES or not x.is_cpu or x.shape[2] % 2
            or any(t.dtype != x.dtype or not t.is_cpu or t.shape[-2:] != x.shape[1:] or t.numel() != x.shape[1] * x.shape[2]
                   for t in (cos, sin))):
        raise ValueError("rotate takes x [H, T, D] (D even) and cos, sin [T, D] or [1, T, D], float32 or float64 CPU "
                         f"tensors of one dtype; got x {x.dtype} {tuple(x.shape)}, cos {cos.dtype} {tuple(cos.shape)}, "
                         f"sin {sin.dtype} {tuple(sin.shape)}")
    h, t, d = x.shape
    if x.stride(2) != 1:
        x = x.contiguous()
    cos, sin = (c.reshape(t, d) for c in (cos, sin))
    cos, sin = (c if c.stride(1) == 1 else c.contiguous() for c in (cos, sin))
    y = torch.empty_like(x)
    if y.stride(2) != 1:
        y = torch.empty(h, t, d, dtype=x.dtype)
    lib.orca_rope(DTYPES[x.dtype], x.data_ptr(), h, t, d, x.stride(0), x.stride(1), cos.data_ptr(), cos.stride(0),
                  sin.data_ptr(), sin.stride(0), y.data_ptr(), y.stride(0), y.stride(1))
    return y
