"""Residual add + norm on the CPU in C (``cpu_norm.c``): ``s = x + r``, ``y = layer_norm(s)`` or
``y = rms_norm(s)``, in one pass over each row, float32 and float64.

``passes/fuse_norms.py`` (a pass of the ``cpu`` backend's lowering) turns every ``add`` that
feeds a ``layer_norm`` over the last dim into one call of ``add_layer_norm`` (both results kept:
the sum is the residual stream). On a pre-norm model that is every norm: GPT-2 has 25. It saves a
pass over the rows per residual point and one of two calls; a call costs about what ATen's add +
layer_norm cost together at one row (``benchmarks/call_overhead.py``); on W1 it took 0.954x the
time at the median of 14 ABBA rounds (docs/benchmarks.md).

``add_rms_norm`` does the same for HF's RMSNorm (``w * (s * rsqrt(mean(s^2) + eps))``, six ATen
ops and the add), and under float32 reads a 16-bit ``r`` and stores a 16-bit ``y`` (the casts
around a 16-bit linear, fused). ``fuse_norms`` uses it on the 16-bit-multiply path only (W2, where
its A/B is in docs/benchmarks.md); on a float32 Llama-shaped W1 the same fusion showed no gain
beyond the spread, and float32 graphs keep ATen's ops.

Numerics: two-pass mean and variance in the input dtype with vector accumulators, so results
differ from torch's by rounding only (a few ulp of each row's scale).

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
    fn = lib.orca_add_layer_norm
    fn.argtypes = [ctypes.c_int, ptr, i64, ptr, i64, ptr, i64, ptr, ptr, ptr, i64, i64, i64, ctypes.c_double,
                   ctypes.c_int]
    fn.restype = ctypes.c_int
    fn = lib.orca_add_rms_norm
    fn.argtypes = [ctypes.c_int, ptr, i64, ptr, i64, ctypes.c_int, ptr, i64, ptr, ptr, i64, ctypes.c_int, i64, i64,
                   ctypes.c_double, ctypes.c_int]
    fn.restype = ctypes.c_int


LIB = cbuild.CLibrary("cpu_norm.c", _declare)


available, why_unavailable = LIB.available, LIB.why_unavailable  # built and loaded at first call


def add_layer_norm(x: torch.Tensor, r: torch.Tensor | None, weight: torch.Tensor | None,
                   bias: torch.Tensor | None, eps: float, reuse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, layer_norm(s, [n], weight, bias, eps))`` with ``s = x + r`` (``s = x`` when ``r`` is
    None); ``x``, ``r``: ``[..., n]`` of one shape and dtype, ``weight``/``bias``: ``[n]`` or None.

    ``reuse=True`` (the caller's promise that nothing reads ``x`` or ``r`` after this call, which
    ``lower_cpu`` proves from the graph): ``s`` is written over ``x`` and ``y`` over ``r``, where
    their layouts allow (2-d, rows of unit column stride, no byte shared), instead
    of into two new tensors. The outputs of a decode step's norms then land in memory that is in
    cache already, not in fresh allocations the rows must be fetched for."""
    lib = LIB._lib or LIB.load()
    if lib is None:
        raise RuntimeError(f"the C norm kernel is unavailable: {LIB.why_unavailable()}")
    dtype = x.dtype
    shape = x.shape
    n = shape[-1] if shape else 0
    # the usual case in a few cheap tests; the messages are built only when one fails
    if (dtype not in DTYPES or not x.is_cpu or n == 0
            or (r is not None and (r.dtype != dtype or not r.is_cpu or r.shape != shape))
            or (weight is not None and (weight.dtype != dtype or not weight.is_cpu or weight.shape != (n,)))
            or (bias is not None and (bias.dtype != dtype or not bias.is_cpu or bias.shape != (n,)))):
        raise ValueError(_why_not(x, r, weight, bias, "add_layer_norm"))
    x2 = _rows(x, n)
    r2 = None if r is None else _rows(r, n)
    if weight is not None and not weight.is_contiguous():
        weight = weight.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    m = x2.shape[0]
    if reuse and r2 is not None and x2 is x and r2 is r and _disjoint(x, r, m, n):
        s, y = x, r  # both inputs die here (the caller's word); their rows take the results
    else:
        s = x2.new_empty(m, n)
        y = x2.new_empty(m, n)
    r_ptr, ldr = (None, 0) if r2 is None else (r2.data_ptr(), r2.stride(0))
    w_ptr = None if weight is None else weight.data_ptr()
    lib.orca_add_layer_norm(DTYPES[dtype], x2.data_ptr(), x2.stride(0), r_ptr, ldr, s.data_ptr(), s.stride(0),
                            w_ptr, None if bias is None else bias.data_ptr(), y.data_ptr(), y.stride(0), m, n,
                            float(eps), torch.get_num_threads())
    if len(shape) == 2:
        return s, y
    return s.view(shape), y.view(shape)


# a 16-bit operand's code in orca_add_rms_norm (0: the row's own dtype)
SIXTEEN_BIT = {torch.bfloat16: 1, torch.float16: 2}


def takes(dtype: torch.dtype) -> bool:
    """Whether this build of ``add_rms_norm`` reads and writes ``dtype`` (bfloat16 always, float16
    where the C compiler has ``_Float16``) beside float32 rows; False without the kernel."""
    lib = LIB.load()
    code = SIXTEEN_BIT.get(dtype)
    return (lib is not None and code is not None
            and lib.orca_add_rms_norm(0, None, 0, None, 0, code, None, 0, None, None, 0, code, 0, 1, 1e-6, 1) == 0)


def add_rms_norm(x: torch.Tensor, r: torch.Tensor | None, weight: torch.Tensor | None, eps: float,
                 reuse: bool = False, out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, weight * (s * rsqrt(mean(s**2, -1) + eps)))`` with ``s = x + r`` (``s`` is ``x`` itself
    when ``r`` is None: not copied): HF's RMSNorm (Llama, Qwen2, Mistral) in ``x``'s dtype, with the
    residual add that feeds it. Shapes and ``reuse`` as in ``add_layer_norm`` (``y`` goes over ``r``
    only where they share a dtype).

    Under float32 ``x``, ``r`` may be bfloat16 or float16 (a 16-bit linear's result: the add widens
    it exactly, as ATen's type promotion would), and ``out_dtype`` bfloat16 or float16 stores ``y``
    rounded to nearest even (the cast in front of a 16-bit linear, fused); ``s`` stays float32."""
    lib = LIB._lib or LIB.load()
    if lib is None:
        raise RuntimeError(f"the C norm kernel is unavailable: {LIB.why_unavailable()}")
    dtype = x.dtype
    out_dtype = dtype if out_dtype is None else out_dtype
    shape = x.shape
    n = shape[-1] if shape else 0
    r_code = 0 if r is None or r.dtype == dtype else SIXTEEN_BIT.get(r.dtype, -1)
    y_code = 0 if out_dtype == dtype else SIXTEEN_BIT.get(out_dtype, -1)
    if (dtype not in DTYPES or not x.is_cpu or n == 0 or r_code < 0 or y_code < 0
            or (dtype != torch.float32 and (r_code or y_code))
            or (r is not None and (not r.is_cpu or r.shape != shape))
            or (weight is not None and (weight.dtype != dtype or not weight.is_cpu or weight.shape != (n,)))):
        raise ValueError(_why_not(x, r, weight, None, "add_rms_norm", out_dtype))
    x2 = _rows(x, n)
    r2 = None if r is None else _rows(r, n)
    if weight is not None and not weight.is_contiguous():
        weight = weight.contiguous()
    m = x2.shape[0]
    both_die = reuse and r2 is not None and x2 is x and r2 is r and _disjoint(x, r, m, n)
    # without a residual s is x itself (the kernel neither copies nor writes it)
    s = x2 if r2 is None or both_die else x2.new_empty(m, n)
    y = r if both_die and r.dtype == out_dtype else x2.new_empty(m, n, dtype=out_dtype)
    r_ptr, ldr = (None, 0) if r2 is None else (r2.data_ptr(), r2.stride(0))
    rc = lib.orca_add_rms_norm(DTYPES[dtype], x2.data_ptr(), x2.stride(0), r_ptr, ldr, r_code, s.data_ptr(),
                               s.stride(0), None if weight is None else weight.data_ptr(), y.data_ptr(), y.stride(0),
                               y_code, m, n, float(eps), torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"add_rms_norm: this build of the C norm kernel takes no float16 (r {None if r is None else r.dtype}, "
                         f"out_dtype {out_dtype})")
    if len(shape) == 2:
        return s, y
    return s.view(shape), y.view(shape)


def _why_not(x, r, weight, bias, name, out_dtype=None) -> str:
    if name == "add_rms_norm" and x.dtype == torch.float32 and (
            out_dtype not in (None, torch.float32, *SIXTEEN_BIT)
            or (r is not None and r.dtype not in (torch.float32, *SIXTEEN_BIT))):
        return (f"{name} takes r and out_dtype in float32, bfloat16 or float16 under a float32 x, got "
                f"r {None if r is None else r.dtype}, out_dtype {out_dtype}")
    if name == "add_rms_norm" and x.dtype == torch.float64 and (
            out_dtype not in (None, torch.float64) or (r is not None and r.dtype != torch.float64)):
        return (f"{name} takes 16-bit r or out_dtype under a float32 x only, got x float64, "
                f"r {None if r is None else r.dtype}, out_dtype {out_dtype}")
    if name == "add_rms_norm" and x.dtype == torch.float32 and r is not None and r.dtype in SIXTEEN_BIT:
        r = r.float()  # its dtype is fine: the shapes or devices are what is wrong
    if not x.shape or x.shape[-1] == 0:
        return f"{name} normalises over the last dim, which x {tuple(x.shape)} does not have"
    tensors = {"x": x, "r": r, "weight": weight, "bias": bias}
    given = {key: t for key, t in tensors.items() if t is not None}
    if x.dtype not in DTYPES or any(t.dtype != x.dtype or not t.is_cpu for t in given.values()):
        return (f"{name} takes float32 or float64 CPU tensors of one dtype, got "
                + ", ".join(f"{key} {t.dtype} on {t.device}" for key, t in given.items()))
    return (f"{name}: shapes do not fit: "
            + ", ".join(f"{key} {tuple(t.shape)}" for key, t in given.items())
            + f" (r must match x; weight and bias must be [{x.shape[-1]}])")


def _disjoint(x: torch.Tensor, r: torch.Tensor, m: int, n: int) -> bool:
    """Whether the [m, n] row blocks of ``x`` and ``r`` (unit column stride) share no byte."""
    a, b = x.data_ptr(), r.data_ptr()
    return (a + ((m - 1) * x.stride(0) + n) * x.element_size() <= b
            or b + ((m - 1) * r.stride(0) + n) * r.element_size() <= a)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` as [M, n] rows with unit column stride and a single row stride (a copy if need be)."""
    if t.dim() == 2 and t.stride(1) == 1:
        return t
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 or n == 1 else t2.contiguous()
