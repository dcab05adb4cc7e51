"""``orca::attention`` on the CPU with a C kernel for the decodes.

The torch reference (``attention_ref``) attends decodes by gathering each request's blocks into a
padded copy and running SDPA on it: the context is read from the cache, written to the copy and
read again. ``cpu_decode_attention.c`` reads each key and value row once, in place, through the
block table (one pass for the scores, one for the weighted sum of V), with the query heads of a
GQA group sharing every row. On W1's decodes the whole op is 4.5x faster per layer than the
reference (``benchmarks/cpu_attention.py``). Stores and multi-token (prefill) requests stay with the
reference: prefill attention is compute-bound and SDPA does it well.

The kernel is plain C (no torch headers), built at first use with the system's C compiler into a
cache directory (``$ORCA_CACHE_DIR``, else ``$XDG_CACHE_HOME/orca_compile``, else
``~/.cache/orca_compile``) under a name that hashes the source, the flags, the compiler and the
CPU's feature flags, and loaded with ``ctypes`` (which releases the GIL during the call). Where no
compiler is found or the build fails, ``available()`` is False and dispatch keeps the reference;
``why_unavailable()`` says why. ``ORCA_CPU_KERNELS=0`` turns the kernel off.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading

import torch

from orca_compile.kernels import attention_ref

SOURCE = pathlib.Path(__file__).with_name("cpu_decode_attention.c")
FLAGS = ["-O3", "-fPIC", "-shared", "-fno-math-errno"]
# -fopenmp: parallel over (request, KV head) on torch's own OpenMP pool (see the C source);
# -fopenmp-simd alone (vector loops, one thread) where the compiler has no OpenMP runtime.
VARIANTS = (["-march=native", "-fopenmp"], ["-fopenmp"], ["-march=native", "-fopenmp-simd"], ["-fopenmp-simd"])
DTYPES = {torch.float32: 0, torch.float64: 1}

_lock = threading.Lock()
_lib = None
_error: str | None = None


def cache_dir() -> pathlib.Path:
    if os.environ.get("ORCA_CACHE_DIR"):
        return pathlib.Path(os.environ["ORCA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "orca_compile"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return ""


def _build() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    if not sys.platform.startswith("linux"):
        raise RuntimeError(f"the C decode kernel is built on Linux only (this is {sys.platform})")
    source = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256(b"\0".join([source, repr((FLAGS, VARIANTS)).encode(), str(version).encode(),
                                     _cpu_flags().encode(), str(torch.__version__).encode()])).hexdigest()[:16]
    target = cache_dir() / f"cpu_decode_attention-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            errors = []
            for extra in VARIANTS:  # the first that builds
                done = subprocess.run([cc, *FLAGS, *extra, str(SOURCE), "-o", tmp, "-lm"], capture_output=True,
                                      text=True)
                if done.returncode == 0:
                    break
                errors.append(done.stderr.strip()[-800:])
            else:
                raise RuntimeError(f"{cc} failed to build {SOURCE.name}: {errors[-1]}")
            os.replace(tmp, target)  # atomic: a concurrent build never loads a half-written file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    fn = lib.orca_decode_attention
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, ptr, i64, i64, i64, i64, i64, ptr, ptr, ptr, i64, i64,
                   ctypes.c_double, i64, ctypes.c_double, ptr, i64, i64, i64, ctypes.c_int]
    fn.restype = ctypes.c_int
    return lib


def _load():
    global _lib, _error
    if _lib is None and _error is None:
        with _lock:
            if _lib is None and _error is None:
                if os.environ.get("ORCA_CPU_KERNELS", "1").strip().lower() in ("0", "false", "off", "no"):
                    _error = "disabled by ORCA_CPU_KERNELS=0"
                else:
                    try:
                        _lib = _build()
                    except (RuntimeError, OSError) as exc:
                        _error = str(exc)
    return _lib


def available() -> bool:
    return _load() is not None


def why_unavailable() -> str | None:
    _load()
    return _error


def decode_attention(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale, sliding_window,
                     softcap, out, num_threads: int | None = None) -> None:
    """Fill ``out``'s rows of every one-token request (see the C source for the semantics)."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"the C decode kernel is unavailable: {_error}")
    if q.dtype not in DTYPES or not (q.dtype == k_cache.dtype == v_cache.dtype == out.dtype):
        raise ValueError(f"decode_attention takes float32 or float64 tensors of one dtype, got q {q.dtype}, "
                         f"cache {k_cache.dtype}/{v_cache.dtype}, out {out.dtype}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and out.stride(-1) == 1):
        raise ValueError("decode_attention needs contiguous caches and an output with unit last stride")
    meta = [t.to(torch.int64).contiguous() for t in (query_start_loc, seq_lens, block_tables)]
    qsl, lens, tables = meta
    num_reqs = lens.shape[0]
    max_len = int(lens.max()) if num_reqs else 0
    nh, nkv = q.shape[1], k_cache.shape[2]
    if nh % nkv:
        raise ValueError(f"{nh} query heads do not split into groups over {nkv} KV heads")
    rc = lib.orca_decode_attention(
        DTYPES[q.dtype], q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(), v_cache.data_ptr(),
        k_cache.shape[1], nkv, k_cache.shape[3], v_cache.shape[3], nh, qsl.data_ptr(), lens.data_ptr(),
        tables.data_ptr(), tables.stride(0), num_reqs, float(scale), int(sliding_window), float(softcap),
        out.data_ptr(), out.stride(0), out.stride(1), max_len, num_threads or torch.get_num_threads())
    if rc != 0:
        raise MemoryError("decode_attention: the kernel could not allocate its scratch buffers")


def attention(q, k, v, k_cache, v_cache, slot_mapping, query_start_loc, seq_lens, block_tables,
              scale, sliding_window=0, softcap=0.0):
    """``orca::attention``: the reference's store and prefill paths, this kernel's decodes."""
    attention_ref.store_kv(k, v, k_cache, v_cache, slot_mapping)
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    decode_attention(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale, sliding_window,
                     softcap, out)
    attention_ref.attend_prefills(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale,
                                  sliding_window, softcap, out, k=k, v=v)
    return out
