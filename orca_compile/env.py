"""Every environment variable orca-compile reads, read in this module only, once.

``get()`` reads them at its first call and keeps the result; nothing else in the package looks at
``os.environ`` for its own settings. ``reload()`` reads them again (tests that change a variable
call it; so does nothing else). The README lists the same table.

=========================  ===============================================================
``ORCA_ATTENTION_BACKEND`` ``auto`` (default), ``torch``, ``cpu`` or ``triton``: force one
                           implementation of ``orca::attention`` (``kernels/dispatch.py``)
``ORCA_CPU_KERNELS``       ``0`` turns every C kernel off (``kernels/cbuild.py``)
``ORCA_CACHE_DIR``         where the C kernels are built (default ``$XDG_CACHE_HOME/orca_compile``,
                           else ``~/.cache/orca_compile``)
``CC``                     the C compiler to try first (then ``cc``, ``gcc``, ``clang``)
``ORCA_HUGE_PAGES``        ``0``: no transparent huge pages for weights and the KV cache
``ORCA_TUNE_MALLOC``       ``0``: leave glibc's malloc thresholds alone (``runtime/host.py``)
``ORCA_VERIFY_PASSES``     ``1``: re-check every flattened node on fake tensors (slow; tests)
``TRITON_INTERPRET``       ``1``: Triton's interpreter (CPU; Triton reads it too)
``ORCA_LOG_LEVEL``         e.g. ``INFO``: print this package's log records of that level and
                           above to stderr (default: quiet; the CLI's ``-v`` is ``INFO``)
``ONEDNN_MAX_CPU_ISA``     oneDNN's own cap on the instructions it uses (or the older
                           ``DNNL_MAX_CPU_ISA``); read here too: below AMX, a 16-bit
                           checkpoint takes float32 arithmetic (``sixteen_bit.py``)
``RANK``, ``WORLD_SIZE``   set by ``torchrun``: this process is one rank of a launch across
                           machines (the CLI then serves on rank 0 and follows it elsewhere)
=========================  ===============================================================
"""
from __future__ import annotations

import dataclasses
import os
import pathlib


def _flag(value: str | None, default: bool) -> bool:
    if value is None or not value.strip():
        return default
    return value.strip().lower() not in ("0", "false", "off", "no")


@dataclasses.dataclass(frozen=True)
class Environment:
    attention_backend: str  # "" for auto
    cpu_kernels: bool
    cache_dir: pathlib.Path
    cc: str | None
    huge_pages: bool
    tune_malloc: bool
    verify_passes: bool
    triton_interpret: bool
    log_level: str  # "" for quiet
    launch_rank: int  # torchrun's RANK (0 when not launched by torchrun)
    launch_world_size: int  # torchrun's WORLD_SIZE (1 when not launched by torchrun)
    launch_local_rank: int  # torchrun's LOCAL_RANK: which of this machine's devices the rank takes
    onednn_max_cpu_isa: str  # "VAR=VALUE" (upper case) of oneDNN's ISA cap, "" when unset

    @classmethod
    def read(cls, environ=None) -> "Environment":
        e = os.environ if environ is None else environ
        if e.get("ORCA_CACHE_DIR"):
            cache = pathlib.Path(e["ORCA_CACHE_DIR"])
        else:
            base = e.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
            cache = pathlib.Path(base) / "orca_compile"
        backend = e.get("ORCA_ATTENTION_BACKEND", "").strip().lower()
        # as oneDNN reads it: the new name first, the first that is set and not empty, any case, no
        # stripping (oneDNN ignores a value it does not list, " AVX2" among them)
        isa = next((f"{var}={e[var].upper()}" for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA") if e.get(var)), "")
        return cls(
            attention_backend="" if backend == "auto" else backend,
            cpu_kernels=_flag(e.get("ORCA_CPU_KERNELS"), True),
            cache_dir=cache,
            cc=e.get("CC") or None,
            huge_pages=e.get("ORCA_HUGE_PAGES", "1").strip() != "0",
            tune_malloc=e.get("ORCA_TUNE_MALLOC", "1").strip() != "0",
            verify_passes=e.get("ORCA_VERIFY_PASSES", "0").strip() == "1",
            triton_interpret=e.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes"),
            log_level=e.get("ORCA_LOG_LEVEL", "").strip().upper(),
            launch_rank=int(e.get("RANK", "0") or 0),
            launch_world_size=int(e.get("WORLD_SIZE", "1") or 1),
            launch_local_rank=int(e.get("LOCAL_RANK", "0") or 0),
            onednn_max_cpu_isa=isa,
        )


_current: Environment | None = None


def get() -> Environment:
    global _current
    if _current is None:
        _current = Environment.read()
    return _current


def reload() -> Environment:
    global _current
    _current = Environment.read()
    return _current


def configure_logging(level: str | int | None = None) -> None:
    """Send this package's log records of ``level`` and above to stderr (``None``: the
    ``ORCA_LOG_LEVEL`` variable's level, and nothing when it is unset). The package is quiet by
    default: its logger has a ``NullHandler`` only, as a library's should."""
    import logging
    import sys

    level = level if level is not None else get().log_level
    if not level:
        return
    logger = logging.getLogger("orca_compile")
    ours = [h for h in logger.handlers if getattr(h, "_orca", False)]
    if ours:
        ours[0].setStream(sys.stderr)  # the stderr of now (a CLI run may have replaced it)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("orca-compile %(levelname)s %(name)s: %(message)s"))
        handler._orca = True
        logger.addHandler(handler)
    logger.setLevel(level if isinstance(level, int) else str(level).upper())
