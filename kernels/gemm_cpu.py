"""Linear layers on the CPU with the C kernel in ``cpu_gemm.c``: ``act(x @ W^T + bias)`` on a weight
packed once, float32 and float64, and float32 arithmetic on bfloat16 or float16 weights.

``passes/lower_cpu.py`` (``kernel="orca"``) packs every linear weight of the graph with ``pack``
and calls ``linear`` from the lowered graph. On W1's decode steps (GPT-2 small, 1-32 rows, the
497 MB of weights streaming from DRAM) it takes 0.6-0.8x the time of oneDNN on weights packed in
its own layout, and about the same at 512 rows (``benchmarks/cpu_linear.py``; docs/benchmarks.md).

Activations fused into the epilogue: ``ACTIVATIONS``. float32 computes them with a vectorised exp
(a few ulp from torch's); float64 with libm.

16-bit weights (``pack(w, storage=torch.bfloat16)``): the weight is packed in 16 bits and widened
to float32 in registers as the kernel reads it, so a decode step streams half the bytes of a
float32 weight; ``x``, the bias, the output and every multiply-add are float32. The result is the
float32 GEMM on the weight rounded to 16 bits (exactly, for a weight that was 16-bit already).

Built and loaded by ``cbuild`` like the attention kernel: ``available()`` is False (and
``why_unavailable()`` says why) without a C compiler or with ``ORCA_CPU_KERNELS=0``.
"""
from __future__ import annotations

import ctypes

import torch

from orca_compile.kernels import cbuild, hostmem

DTYPES = {torch.float32: 0, torch.float64: 1}  # the activations' dtypes (x, bias, output)
# orca_gemm's code for (activations' dtype, packed weight's dtype)
CODES = {(torch.float32, torch.float32): 0, (torch.float64, torch.float64): 1,
         (torch.float32, torch.bfloat16): 2, (torch.float32, torch.float16): 3}
WEIGHT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# output columns per packed panel: 64 bytes per k for float32 and float64, 32 for 16-bit weights
PANEL = {torch.float32: 16, torch.float64: 8, torch.bfloat16: 16, torch.float16: 16}
ACTIVATIONS = {"none": 0, "relu": 1, "silu": 2, "gelu_tanh": 3, "sigmoid": 4}


def _declare(lib):
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn = lib.orca_gemm
    fn.argtypes = [ctypes.c_int, ptr, i64, ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    lib.orca_gemm_supports.argtypes = [ctypes.c_int]
    lib.orca_gemm_supports.restype = ctypes.c_int
    if hasattr(lib, "orca_gemm_many_rows_from"):  # absent from older builds (benchmarks/cpu_gemm_ab.py loads them)
        lib.orca_gemm_many_rows_from.argtypes = [ctypes.c_int]
        lib.orca_gemm_many_rows_from.restype = i64


LIB = cbuild.CLibrary("cpu_gemm.c", _declare)


available, why_unavailable = LIB.available, LIB.why_unavailable  # built and loaded at first call


def supports(weight_dtype: torch.dtype) -> bool:
    """Whether the built kernel takes weights of ``weight_dtype`` (float16 needs a C compiler with
    ``_Float16``); False when the kernel is unavailable."""
    lib = LIB.load()
    code = CODES.get((torch.float64 if weight_dtype == torch.float64 else torch.float32, weight_dtype))
    return lib is not None and code is not None and bool(lib.orca_gemm_supports(code))


def many_rows_from(weight_dtype: torch.dtype) -> int | None:
    """The row count from which a float32 GEMM on ``weight_dtype`` weights takes the kernel's
    many-rows driver (12-row blocks on AVX-512; 16-bit weights widened once per group of panels),
    or None where it never does (float32 weights without AVX-512; float64)."""
    lib = LIB.load()
    if lib is None:
        raise RuntimeError(f"the C GEMM kernel is unavailable: {LIB.why_unavailable()}")
    code = CODES.get((torch.float32, weight_dtype))
    start = -1 if code is None else int(lib.orca_gemm_many_rows_from(code))
    return None if start < 0 else start


def pack(weight: torch.Tensor, storage: torch.dtype | None = None) -> torch.Tensor:
    """``weight`` [out, in] -> [ceil(out / NR), in, NR], NR = ``PANEL[storage]``, zero-padded past
    ``out``, in ``storage`` (default: the weight's dtype; bfloat16 or float16 for 16-bit weights
    under float32 arithmetic, rounded to nearest even when ``weight`` is wider)."""
    storage = weight.dtype if storage is None else storage
    if weight.dim() != 2 or weight.dtype not in WEIGHT_DTYPES or weight.device.type != "cpu":
        raise ValueError(f"pack takes a 2-D float32/float64/bfloat16/float16 CPU weight, got {tuple(weight.shape)} "
                         f"{weight.dtype} on {weight.device}")
    if storage not in WEIGHT_DTYPES or (storage == torch.float64) != (weight.dtype == torch.float64):
        raise ValueError(f"pack stores a {weight.dtype} weight as float32, bfloat16 or float16 (float64 as float64), "
                         f"not {storage}")
    n, k = weight.shape
    nr = PANEL[storage]
    panels = -(-n // nr)
    padded = weight.new_zeros(panels * nr, k, dtype=storage)
    padded[:n] = weight
    out = hostmem.empty((panels, k, nr), storage)  # streamed at every call: huge pages spare the TLB
    return out.copy_(padded.view(panels, nr, k).transpose(1, 2))


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int,
           activation: int = 0) -> torch.Tensor:
    """``act(x @ W^T + bias)`` for ``packed = pack(W)``; ``x`` [..., in]; ``activation`` a value of
    ``ACTIVATIONS``."""
    lib = LIB._lib or LIB.load()
    if lib is None:
        raise RuntimeError(f"the C GEMM kernel is unavailable: {LIB.why_unavailable()}")
    dtype = x.dtype
    # the checks run on every call of every layer: cheap tests first, messages only on failure
    code = CODES.get((dtype, packed.dtype))
    if (code is None or (bias is not None and bias.dtype != dtype)
            or not x.is_cpu or not packed.is_cpu or (bias is not None and not bias.is_cpu)):
        raise ValueError(_why_not(x, packed, bias))
    k = x.shape[-1]
    nr = PANEL[packed.dtype]
    if packed.shape != (-(-out_features // nr), k, nr) or not packed.is_contiguous():
        raise ValueError(f"weight packed as {tuple(packed.shape)} does not hold {out_features} outputs of {k} inputs")
    if bias is not None and (bias.shape != (out_features,) or not bias.is_contiguous()):
        raise ValueError(f"bias of shape {tuple(bias.shape)} for {out_features} outputs")
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = x2.new_empty(m, out_features)
    rc = lib.orca_gemm(code, x2.data_ptr(), x2.stride(0), packed.data_ptr(),
                       None if bias is None else bias.data_ptr(), out.data_ptr(), out_features, m, out_features, k,
                       activation, torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"linear: activation code {activation} is not one of {ACTIVATIONS}"
                         if lib.orca_gemm_supports(code) else f"this build of the C GEMM takes no {packed.dtype} weights")
    return out if x.dim() == 2 else out.view(*x.shape[:-1], out_features)


def _why_not(x, packed, bias) -> str:
    if {t.device.type for t in (x, packed) + (() if bias is None else (bias,))} != {"cpu"}:
        return (f"linear takes CPU tensors, got x on {x.device}, weight on {packed.device}"
                + ("" if bias is None else f", bias on {bias.device}"))
    return (f"linear takes float32 or float64 tensors of one dtype (or float32 with bfloat16/float16 weights), "
            f"got x {x.dtype}, weight {packed.dtype}, bias {None if bias is None else bias.dtype}")
