"""Building and loading the plain-C CPU kernels (``cpu_*.c`` beside this file).

Each source is compiled at first use with the system's C compiler into a cache directory
(``$ORCA_CACHE_DIR``, else ``$XDG_CACHE_HOME/orca_compile``, else ``~/.cache/orca_compile``) under a
name that hashes the source and the headers beside it (``cpu_simd.h``), the flags (with the CPU
maker's tuning define, ``tuning_flags``), the compiler (its path and version) and the CPU's feature
flags, and loaded with ``ctypes`` (which releases the GIL during a call). The first flag variant that builds wins: native
code with OpenMP, then OpenMP alone, then vector code on one thread. Where no compiler is found or
every variant fails, the library is unavailable and says why; callers keep their torch path.
``ORCA_CPU_KERNELS=0`` turns every C kernel off.

OpenMP: a library built with ``-fopenmp`` needs ``libgomp.so.1``, which the loader resolves to the
copy torch has loaded already, so the kernels run on torch's own thread pool (a second pool would
spin against torch's on the same cores).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
from typing import Callable

import torch

from orca_compile import env

log = logging.getLogger(__name__)

FLAGS = ["-O3", "-fPIC", "-shared", "-fno-math-errno"]
VARIANTS = (["-march=native", "-fopenmp"], ["-fopenmp"], ["-march=native", "-fopenmp-simd"],
            ["-fopenmp-simd", "-Wno-psabi"])
ENV_DISABLE = "ORCA_CPU_KERNELS"


def cache_dir() -> pathlib.Path:
    return env.get().cache_dir


def compiler() -> str | None:
    for name in (env.get().cc, "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def disabled() -> bool:
    return not env.get().cpu_kernels


def tuning_flags(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """Defines that pick a kernel's per-CPU-maker tuning (cpu_gemm.c's prefetching, measured on an
    AMD Zen 4 and on an Intel Xeon with opposite answers): Intel's for Intel, the AMD machine's
    for every other CPU."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return ["-DORCA_CPU_INTEL=1"] if "GenuineIntel" in line else []
    except OSError:
        pass
    return []


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return ""


def build(source: pathlib.Path) -> pathlib.Path:
    """The shared library for ``source``, built into the cache directory unless it is there."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    if not sys.platform.startswith("linux"):
        raise RuntimeError(f"the C kernels are built on Linux only (this is {sys.platform})")
    # the source and every header beside it (cpu_simd.h): editing a header must rebuild
    text = b"\0".join([source.read_bytes(), *(h.read_bytes() for h in sorted(source.parent.glob("*.h")))])
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    flags = [*FLAGS, *tuning_flags()]
    key = hashlib.sha256(b"\0".join([text, repr((flags, VARIANTS)).encode(), cc.encode(), str(version).encode(),
                                     _cpu_flags().encode(), str(torch.__version__).encode()])).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            errors = []
            for extra in VARIANTS:  # the first that builds
                done = subprocess.run([cc, *flags, *extra, str(source), "-o", tmp, "-lm"], capture_output=True,
                                      text=True)
                if done.returncode == 0:
                    break
                errors.append(done.stderr.strip()[-800:])
            else:
                raise RuntimeError(f"{cc} failed to build {source.name}: {errors[-1]}")
            os.replace(tmp, target)  # atomic: a concurrent build never loads a half-written file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


class CLibrary:
    """One C source: built and loaded on first use (thread-safe), or unavailable with a reason.

    ``declare(lib)`` sets the ``argtypes``/``restype`` of the library's functions."""

    def __init__(self, source: str, declare: Callable[[ctypes.CDLL], None]):
        self.source = pathlib.Path(__file__).with_name(source)
        self.declare = declare
        self._lock = threading.Lock()
        self._lib: ctypes.CDLL | None = None
        self._error: str | None = None

    def load(self) -> ctypes.CDLL | None:
        if self._lib is None and self._error is None:
            with self._lock:
                if self._lib is None and self._error is None:
                    if disabled():
                        self._error = f"disabled by {ENV_DISABLE}=0"
                    else:
                        try:
                            lib = ctypes.CDLL(str(build(self.source)))
                            self.declare(lib)
                            self._lib = lib
                        except (RuntimeError, OSError, AttributeError) as exc:
                            self._error = str(exc)
                            log.warning("the C kernel %s is unavailable (%s); its torch path runs instead",
                                        self.source.name, exc)
        return self._lib

    def available(self) -> bool:
        return self.load() is not None

    def why_unavailable(self) -> str | None:
        self.load()
        return self._error

    def forget(self) -> None:
        """Drop the loaded library and any error (the next use builds or loads again; for tests)."""
        with self._lock:
            self._lib, self._error = None, None
