"""One entry point per op; picks the implementation for the device at hand.

``orca::attention`` runs the Triton kernels (``attention_triton``) on CUDA and the torch reference
(``attention_ref``) elsewhere. ``ORCA_ATTENTION_BACKEND`` overrides the choice:

* unset, empty or ``auto``: Triton on CUDA when triton imports, else the reference;
* ``torch``: always the reference (e.g. to bisect a kernel bug on a GPU);
* ``triton``: always the kernels, an error when triton is missing. On the CPU that only works with
  ``TRITON_INTERPRET=1`` (Triton's interpreter, slow: for tests), and is an error otherwise.

The variable is read on every call (an ``os.environ`` lookup, cheap next to a launch) so that tests
can flip it with ``monkeypatch``. triton is imported only when the kernels are chosen, so the
package works without it. float64 always takes the reference: ``tl.dot`` has no float64 form and it
is not a serving dtype.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from orca_compile.kernels import attention_ref

ENV_VAR = "ORCA_ATTENTION_BACKEND"
BACKENDS = ("triton", "torch")

_triton_present: bool | None = None


def triton_available() -> bool:
    global _triton_present
    if _triton_present is None:
        _triton_present = importlib.util.find_spec("triton") is not None
    return _triton_present


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def attention_backend(device, dtype: torch.dtype | None = None) -> str:
    """``"triton"`` or ``"torch"``: which implementation ``attention`` runs for tensors on ``device``
    (of ``dtype``, if given). Raises where the forced choice cannot run."""
    device = torch.device(device)
    if dtype == torch.float64:
        return "torch"
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced in ("", "auto"):
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if forced == "torch":
        return "torch"
    if forced != "triton":
        raise ValueError(f"{ENV_VAR}={forced!r}: expected one of {', '.join(BACKENDS)} or auto (unset)")
    if not triton_available():
        raise RuntimeError(f"{ENV_VAR}=triton but triton is not installed (pip install 'orca-compile[triton]')")
    if device.type != "cuda" and not _interpreting():
        raise RuntimeError(f"{ENV_VAR}=triton on a {device.type} device needs TRITON_INTERPRET=1 "
                           "(Triton's interpreter); Triton kernels compile for CUDA only")
    return "triton"


def attention(*args):
    q = args[0]
    if attention_backend(q.device, q.dtype) == "triton":
        from orca_compile.kernels import attention_triton

        return attention_triton.attention(*args)
    return attention_ref.attention(*args)
