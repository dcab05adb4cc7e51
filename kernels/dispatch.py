"""One entry point per op; picks the implementation for the device at hand.

``orca::attention`` runs the Triton kernels (``attention_triton``) on CUDA, the C decode kernel
(``attention_cpu``) on the CPU where it builds, and the torch reference (``attention_ref``)
otherwise. ``ORCA_ATTENTION_BACKEND`` overrides the choice:

* unset, empty or ``auto``: Triton on CUDA when triton imports; on the CPU the C kernel when a C
  compiler built it (float32 and float64), else the reference;
* ``torch``: always the reference (e.g. to bisect a kernel bug);
* ``cpu``: the C kernel, an error off the CPU or where it cannot be built;
* ``triton``: always the kernels, an error when triton is missing. On the CPU that only works with
  ``TRITON_INTERPRET=1`` (Triton's interpreter, slow: for tests), and is an error otherwise.

The variable is read once, with every other one, by ``orca_compile.env`` (tests that change it call
``env.reload()``); the engine's ``cpu`` backend asks once, at lowering (``passes/lower_cpu.py``),
and calls the chosen C path directly. triton is imported only when the kernels are chosen, so the
package works without it. float64 never takes Triton: ``tl.dot`` has no float64 form and it is not
a serving dtype.
"""
from __future__ import annotations

import importlib.util

import torch

from orca_compile import env
from orca_compile.kernels import attention_ref

ENV_VAR = "ORCA_ATTENTION_BACKEND"
BACKENDS = ("triton", "cpu", "torch")

_triton_present: bool | None = None


def triton_available() -> bool:
    global _triton_present
    if _triton_present is None:
        _triton_present = importlib.util.find_spec("triton") is not None
    return _triton_present


def _interpreting() -> bool:
    return env.get().triton_interpret


def _cpu_kernel_fits(device, dtype) -> bool:
    from orca_compile.kernels import attention_cpu

    return device.type == "cpu" and (dtype is None or dtype in attention_cpu.DTYPES) and attention_cpu.available()


def attention_backend(device, dtype: torch.dtype | None = None) -> str:
    """``"triton"``, ``"cpu"`` or ``"torch"``: which implementation ``attention`` runs for tensors
    on ``device`` (of ``dtype``, if given). Raises where the forced choice cannot run."""
    device = torch.device(device)
    forced = env.get().attention_backend
    if not forced:
        if device.type == "cuda" and triton_available() and dtype != torch.float64:
            return "triton"
        return "cpu" if _cpu_kernel_fits(device, dtype) else "torch"
    if forced == "torch":
        return "torch"
    if forced == "cpu":
        if not _cpu_kernel_fits(device, dtype):
            from orca_compile.kernels import attention_cpu

            why = attention_cpu.why_unavailable() or f"it takes float32/float64 CPU tensors, got {dtype} on {device}"
            raise RuntimeError(f"{ENV_VAR}=cpu but the C kernel cannot run here: {why}")
        return "cpu"
    if forced != "triton":
        raise ValueError(f"{ENV_VAR}={forced!r}: expected one of {', '.join(BACKENDS)} or auto (unset)")
    if dtype == torch.float64:
        return "torch"
    if not triton_available():
        raise RuntimeError(f"{ENV_VAR}=triton but triton is not installed (pip install 'orca-compile[triton]')")
    if device.type != "cuda" and not _interpreting():
        raise RuntimeError(f"{ENV_VAR}=triton on a {device.type} device needs TRITON_INTERPRET=1 "
                           "(Triton's interpreter); Triton kernels compile for CUDA only")
    return "triton"


def attention(*args):
    q = args[0]
    backend = attention_backend(q.device, q.dtype)
    if backend == "triton":
        from orca_compile.kernels import attention_triton

        return attention_triton.attention(*args)
    if backend == "cpu":
        from orca_compile.kernels import attention_cpu

        return attention_cpu.attention(*args)
    return attention_ref.attention(*args)
