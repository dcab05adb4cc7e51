"""16-bit (bfloat16, float16) checkpoints on the CPU: which path a model takes.

A 16-bit model on the CPU is captured from a float32 copy of itself (``compile``), so that norms,
softmax, attention, the residual stream and the KV cache run in float32 on the C kernels; what
differs between the two paths is the linear layers (``CaptureInfo.weight_storage`` and
``CaptureInfo.matmul_dtype``, read by ``passes/lower_cpu.py``):

* **float32 arithmetic on 16-bit weights** (``matmul_dtype`` None): the C GEMM keeps each weight in
  its 16 bits and widens it in registers. The same numbers as HF running the checkpoint upcast to
  float32, half the bytes a decode streams. The path on a CPU without 16-bit matrix units, where a
  16-bit multiply is emulated and slower than float32.
* **16-bit multiplies** (``matmul_dtype`` the checkpoint's dtype): each linear runs on oneDNN's
  packed 16-bit weights, its input rounded to the 16-bit dtype and its result (float32
  accumulation) rounded once, then widened back. The path on a CPU with 16-bit matrix units (Intel
  AMX): a prefill's GEMMs 5-12x the float32 C GEMM's rate there (docs/benchmarks.md, W2). Each
  linear rounds as HF does in the 16-bit dtype; everything between the linears stays float32, so
  the engine is on average no farther from the float32 oracle than HF in its own dtype is
  (tested). It needs oneDNN's 16-bit GEMM (``native_supported``: AVX-512 or AVX-NE-CONVERT).

``native`` (``optimize(native_sixteen_bit=)``) chooses: None asks the CPU
(``native_sixteen_bit_matmul``), True or False forces a path (numerics tests, A/B runs).
"""
from __future__ import annotations

import torch

# the backends that run a 16-bit CPU model as a float32 graph (the CPU lowerings)
WIDENS = ("auto", "cpu", "onednn")
SIXTEEN_BIT = (torch.bfloat16, torch.float16)


# oneDNN's cap on the instructions it uses (its "CPU dispatcher control": ONEDNN_MAX_CPU_ISA, or
# DNNL_MAX_CPU_ISA before oneDNN 2.x): the values under which it still multiplies on AMX tiles
_AMX_ISAS = {
    torch.bfloat16: {"AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16",
                     "AVX10_2_512_AMX_2", "ALL", "DEFAULT"},
    torch.float16: {"AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16", "AVX10_2_512_AMX_2", "ALL", "DEFAULT"},
}
# every value oneDNN 3.x lists (and 2.x's MIC ones)
_ISAS = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI", "AVX512_CORE_BF16",
         "AVX512_CORE_FP16", "AVX10_1_512", "AVX10_2_512", "AVX512_MIC", "AVX512_MIC_4OPS"} | _AMX_ISAS[torch.bfloat16]


def onednn_isa_cap(dtype: torch.dtype) -> str | None:
    """``VAR=VALUE`` when the environment caps oneDNN below the AMX instructions that multiply
    ``dtype`` (``env.onednn_max_cpu_isa``); None when it does not (unset, or a value oneDNN does
    not list: it ignores those)."""
    from orca_compile import env

    cap = env.get().onednn_max_cpu_isa
    value = cap.partition("=")[2]
    return cap if value in _ISAS and value not in _AMX_ISAS.get(dtype, ()) else None


def native_sixteen_bit_matmul(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` matrices in hardware that oneDNN uses: AMX tiles for
    bfloat16 (Intel Sapphire Rapids and later), AMX-FP16 for float16, unless the environment caps
    oneDNN below them (``onednn_isa_cap``: then its 16-bit GEMM is emulated and the float32
    arithmetic of the C GEMM is the faster path, as on a CPU without AMX)."""
    return why_not_native(dtype) is None


def why_not_native(dtype: torch.dtype) -> str | None:
    """None when ``native_sixteen_bit_matmul(dtype)``, else the reason, for the log."""
    probe = {torch.bfloat16: "_is_amx_tile_supported", torch.float16: "_is_amx_fp16_supported"}.get(dtype)
    try:
        has = bool(probe and getattr(torch.cpu, probe)())
    except Exception:  # a private probe of torch's: absent or failing means no
        has = False
    if not has:
        return f"this CPU has no {'AMX' if dtype == torch.bfloat16 else 'AMX-FP16'} to multiply {dtype} on"
    cap = onednn_isa_cap(dtype)
    return f"{cap} keeps oneDNN off this CPU's AMX" if cap else None


def native_supported(dtype: torch.dtype) -> bool:
    """Whether oneDNN multiplies ``dtype`` matrices on this CPU at all: bfloat16 needs AVX-512
    (BW, VL, DQ) or AVX-NE-CONVERT, float16 AVX512-FP16 or AMX-FP16 (torch refuses to pack the
    weights elsewhere)."""
    probe = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}.get(dtype)
    try:
        return bool(probe and torch.backends.mkldnn.is_available() and getattr(torch.ops.mkldnn, probe)())
    except Exception:  # a private probe of torch's: absent or failing means no
        return False


def widens(backend: str) -> bool:
    """Whether ``backend`` runs a 16-bit CPU model as a float32 graph: the CPU lowerings do when
    their kernel is there (``auto`` when either is)."""
    from orca_compile.passes import lower_cpu

    if backend not in WIDENS:
        return False
    kernels = ("orca", "onednn") if backend == "auto" else ({"cpu": "orca", "onednn": "onednn"}[backend],)
    return any(lower_cpu.available(k) for k in kernels)


def matmul_dtype(storage: torch.dtype | None, native: bool | None) -> torch.dtype | None:
    """The dtype the linears of a graph widened from ``storage`` multiply in: ``storage`` itself on
    oneDNN when ``native`` (None: this CPU has ``storage`` matrix units) and oneDNN is built in,
    else None (float32 arithmetic)."""
    from orca_compile.passes import lower_cpu

    if storage is None:
        return None
    if native and not lower_cpu.available("onednn"):
        raise ValueError("native_sixteen_bit=True needs oneDNN's packed linears; this torch is built without oneDNN")
    if native and not native_supported(storage):
        need = "AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT" if storage == torch.bfloat16 else "AVX512-FP16 or AMX-FP16"
        raise ValueError(f"native_sixteen_bit=True: oneDNN multiplies {storage} on CPUs with {need}, which this one "
                         f"lacks; leave it None (float32 arithmetic on the 16-bit weights here)")
    if native is None:
        native = (native_sixteen_bit_matmul(storage) and lower_cpu.available("onednn")
                  and native_supported(storage))
    return storage if native else None


def cpu_weights(model: torch.nn.Module) -> torch.dtype | None:
    """bfloat16 or float16 when every floating parameter of ``model`` is that dtype and on the CPU
    (or on meta tensors, for a rank that reads its shard later), else None. Buffers do not count:
    HF keeps some float32 in a 16-bit model (RoPE's inverse frequencies)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    devices = {p.device.type for p in model.parameters()}
    if len(dtypes) == 1 and dtypes <= set(SIXTEEN_BIT) and devices <= {"cpu", "meta"}:
        return dtypes.pop()
    return None


def check_native(native) -> None:
    if not (native is None or native is True or native is False):
        raise ValueError(f"native_sixteen_bit must be None (ask the CPU), True or False, got {native!r}")
