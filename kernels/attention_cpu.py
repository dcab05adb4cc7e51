"""``orca::attention`` on the CPU in C, in place over the paged KV cache.

The torch reference (``attention_ref``) attends decodes by gathering each request's blocks into a
padded copy and running SDPA on it: the context is read from the cache, written to the copy and
read again. ``cpu_attention.c`` reads each key and value row once, in place, through the
block table (one pass for the scores, one for the weighted sum of V), with the query heads of a
GQA group sharing every row. On W1's decodes the whole op is 4.5-6x faster per layer than the
reference (``benchmarks/cpu_attention.py``).

Multi-token requests (prompts, and prompt chunks on a cached context) go to the same library's
``orca_prefill_attention``: per request and KV head it copies the keys and values it needs into
the GEMM's panel layout once, then runs Q K^T, a masked softmax and S V on register-blocked
micro-kernels, six query rows at a time. Against the reference (one SDPA call per prompt, and a
gather plus a masked SDPA per chunk on a cached context) the whole op is 1.7x faster on a
W1-like 512-token prefill iteration and 1.4x on 128-token chunks over 256-1024 cached tokens
(``benchmarks/cpu_attention.py``).

The kernels are plain C (no torch headers), built at first use and cached by ``cbuild`` (where no
compiler is found or the build fails, ``available()`` is False and dispatch keeps the reference;
``why_unavailable()`` says why; ``ORCA_CPU_KERNELS=0`` turns it off). The library also stores
each iteration's K/V rows into their slots, and ``orca_attention`` runs store, decodes and
prefills in one call: ``attention`` below makes one C call per layer and no torch op besides
allocating the output.

Attention sinks and ALiBi slopes (``orca_compile/ops.py``) reach the kernels as ``nh`` float64
values per query head, or NULL: the kernels add the bias after scale and soft-cap and put the sink
into each row's maximum and sum, and skip both where they are NULL, so the usual call does exactly
what it did without them.
"""
from __future__ import annotations

import ctypes

import torch

from orca_compile.kernels import attention_ref, cbuild

DTYPES = {torch.float32: 0, torch.float64: 1}


def _declare(lib):
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for fn in (lib.orca_decode_attention, lib.orca_prefill_attention):
        fn.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, ptr, i64, i64, i64, i64, i64, ptr, ptr, ptr, i64, i64,
                       ctypes.c_double, i64, ctypes.c_double, ptr, ptr, ptr, i64, i64, i64, i64, i64, ctypes.c_int]
        fn.restype = i64
    fn = lib.orca_store_kv
    fn.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, i64, ptr, ptr, i64, i64, i64, ptr, i64, i64]
    fn.restype = ctypes.c_int
    fn = lib.orca_attention
    fn.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, i64, ptr, i64, i64, ptr, ptr, ptr, i64, i64, i64, i64, i64,
                   ptr, ptr, ptr, i64, i64, ctypes.c_double, i64, ctypes.c_double, ptr, ptr, ptr, i64, i64, i64, i64,
                   i64, ctypes.c_int]
    fn.restype = i64


LIB = cbuild.CLibrary("cpu_attention.c", _declare)


available, why_unavailable = LIB.available, LIB.why_unavailable  # built and loaded at first call


def _lib():
    lib = LIB.load()
    if lib is None:
        raise RuntimeError(f"the C decode kernel is unavailable: {LIB.why_unavailable()}")
    return lib


def decode_attention(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale, sliding_window,
                     softcap, out, num_threads: int | None = None, *, sinks=None, alibi_slopes=None) -> int:
    """Fill ``out``'s rows of every one-token request (see the C source for the semantics); returns
    how many requests it left alone (those with more than one token)."""
    return _run("decode_attention", q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale,
                sliding_window, softcap, out, num_threads, sinks, alibi_slopes)


def prefill_attention(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale, sliding_window,
                      softcap, out, num_threads: int | None = None, *, sinks=None, alibi_slopes=None) -> None:
    """Fill ``out``'s rows of every multi-token request (prompts, prompt chunks) from the paged cache,
    where this iteration's K/V must already be stored; one-token requests are left alone."""
    _run("prefill_attention", q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale,
         sliding_window, softcap, out, num_threads, sinks, alibi_slopes)


def _per_head(t, nh: int, name: str):
    """Sinks or ALiBi slopes as the kernels read them: ``nh`` float64 values (one per query head,
    whatever the model's dtype), contiguous on the CPU; None stays None (NULL to the kernels)."""
    if t is None:
        return None
    if t.shape != (nh,) or t.device.type != "cpu":
        raise ValueError(f"{name} must be one value per query head, a CPU tensor of shape ({nh},); got "
                         f"{tuple(t.shape)} on {t.device}")
    return t.to(torch.float64).contiguous()


def _ptr(t):
    return None if t is None else t.data_ptr()


def _run(name, q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale, sliding_window, softcap, out,
         num_threads, sinks, alibi_slopes):
    lib = _lib()
    if q.dtype not in DTYPES or not (q.dtype == k_cache.dtype == v_cache.dtype == out.dtype):
        raise ValueError(f"{name} takes float32 or float64 tensors of one dtype, got q {q.dtype}, "
                         f"cache {k_cache.dtype}/{v_cache.dtype}, out {out.dtype}")
    _check_cpu(q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and out.stride(-1) == 1):
        raise ValueError(f"{name} needs contiguous caches and an output with unit last stride")
    qsl, lens, tables = (t.to(torch.int64).contiguous() for t in (query_start_loc, seq_lens, block_tables))
    nh, nkv, hd, hdv = q.shape[1], k_cache.shape[2], k_cache.shape[3], v_cache.shape[3]
    if nh % nkv:
        raise ValueError(f"{nh} query heads do not split into groups over {nkv} KV heads")
    if (q.dim() != 3 or q.shape[2] != hd or k_cache.shape[:3] != v_cache.shape[:3]
            or out.shape != (q.shape[0], nh, hdv) or out.stride(1) < hdv or out.stride(0) < nh * out.stride(1)
            or qsl.shape != (lens.shape[0] + 1,) or tables.dim() != 2 or tables.shape[0] < lens.shape[0]):
        raise ValueError(f"{name}: shapes do not fit: q {tuple(q.shape)}, caches {tuple(k_cache.shape)} / "
                         f"{tuple(v_cache.shape)}, out {tuple(out.shape)} (strides {out.stride()}), "
                         f"query_start_loc {tuple(qsl.shape)}, seq_lens {tuple(lens.shape)}, "
                         f"block_tables {tuple(tables.shape)}")
    sinks, alibi_slopes = _per_head(sinks, nh, "sinks"), _per_head(alibi_slopes, nh, "alibi_slopes")
    left = getattr(lib, f"orca_{name}")(
        DTYPES[q.dtype], q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(), v_cache.data_ptr(),
        k_cache.shape[1], nkv, hd, hdv, nh, qsl.data_ptr(), lens.data_ptr(),
        tables.data_ptr(), tables.stride(0), lens.shape[0], float(scale), int(sliding_window), float(softcap),
        _ptr(sinks), _ptr(alibi_slopes), out.data_ptr(), out.stride(0), out.stride(1), q.shape[0], tables.shape[1],
        k_cache.shape[0], num_threads or torch.get_num_threads())
    if left == -2:
        raise IndexError(f"{name}: query_start_loc, seq_lens or block_tables point outside the "
                         f"{q.shape[0]} query rows / {k_cache.shape[0]} cache blocks")
    if left < 0:
        raise MemoryError(f"{name}: the kernel could not allocate its scratch buffers")
    return left


def _check_cpu(*tensors):
    devices = {t.device.type for t in tensors}
    if devices != {"cpu"}:
        raise ValueError(f"the C attention kernel takes CPU tensors, got {', '.join(sorted(devices))}")


def store_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    """``attention_ref.store_kv`` in C: rows of ``k``/``v`` into their slots, negative slots skipped.
    Falls back to the reference (which raises on what does not fit) where dtypes, shapes, devices
    or layouts are not the plain ones."""
    plain = (k.dtype == v.dtype == k_cache.dtype == v_cache.dtype and k.dtype in DTYPES
             and k.dim() == v.dim() == 3 and k_cache.dim() == v_cache.dim() == 4
             and k.shape[1:] == k_cache.shape[2:] and v.shape[1:] == v_cache.shape[2:]
             and k.shape[0] == v.shape[0] and k_cache.shape[:3] == v_cache.shape[:3]
             and k.stride(-1) == 1 and v.stride(-1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
             and {t.device.type for t in (k, v, k_cache, v_cache, slot_mapping)} == {"cpu"})
    if not plain:  # the reference handles (or rejects) everything else
        return attention_ref.store_kv(k, v, k_cache, v_cache, slot_mapping)
    slots = slot_mapping.to(torch.int64).contiguous()
    if slots.shape[0] != k.shape[0]:
        raise ValueError(f"store_kv: {slots.shape[0]} slots for {k.shape[0]} tokens")
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    rc = _lib().orca_store_kv(DTYPES[k.dtype], k.data_ptr(), k.stride(0), k.stride(1), v.data_ptr(), v.stride(0),
                              v.stride(1), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[2],
                              k_cache.shape[3], v_cache.shape[3], slots.data_ptr(), slots.shape[0], num_slots)
    if rc != 0:
        raise IndexError(f"store_kv: a slot in {slots.tolist()} is outside the cache's {num_slots} slots")


def attention(q, k, v, k_cache, v_cache, slot_mapping, query_start_loc, seq_lens, block_tables,
              scale, sliding_window=0, softcap=0.0, sinks=None, alibi_slopes=None):
    """``orca::attention`` in C: store this iteration's K/V, attend the one-token requests, then the
    multi-token ones, all in place over the paged cache. The usual case (what the engine feeds: one
    dtype, CPU tensors, contiguous caches and int64 metadata, unit last strides) is one C call
    behind a few cheap checks (21 us a layer in all, against 44 for the three checked calls:
    ``benchmarks/call_overhead.py``), and
    shapes that do not fit, or metadata or slots that point outside the tensors, are refused before
    anything is stored. Other dtypes, devices or layouts take ``store_kv``, ``decode_attention`` and
    ``prefill_attention`` with their checks and conversions."""
    lib = LIB._lib or _lib()
    dtype = q.dtype
    meta = (slot_mapping, query_start_loc, seq_lens, block_tables)
    if not (dtype in DTYPES and dtype == k.dtype == v.dtype == k_cache.dtype == v_cache.dtype
            and q.dim() == k.dim() == v.dim() == 3 and k_cache.dim() == v_cache.dim() == 4
            and q.is_cpu and k.is_cpu and v.is_cpu and k_cache.is_cpu and v_cache.is_cpu
            and all(t.is_cpu and t.dtype == torch.int64 and t.is_contiguous() for t in meta)
            and q.stride(2) == k.stride(2) == v.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()):
        return _attention_checked(q, k, v, k_cache, v_cache, slot_mapping, query_start_loc, seq_lens, block_tables,
                                  scale, sliding_window, softcap, sinks, alibi_slopes)
    rows, nh, hd = q.shape
    num_blocks, bs, nkv = k_cache.shape[:3]
    hdv = v_cache.shape[3]
    num_reqs = seq_lens.shape[0]
    if nh % nkv:
        raise ValueError(f"{nh} query heads do not split into groups over {nkv} KV heads")
    if slot_mapping.shape != (rows,):
        raise ValueError(f"store_kv: {slot_mapping.shape[0] if slot_mapping.dim() else 0} slots for {rows} tokens")
    if (k.shape != (rows, nkv, hd) or v.shape != (rows, nkv, hdv) or k_cache.shape[3] != hd
            or v_cache.shape[:3] != k_cache.shape[:3] or query_start_loc.shape != (num_reqs + 1,)
            or block_tables.dim() != 2 or block_tables.shape[0] < num_reqs or seq_lens.dim() != 1):
        raise ValueError(f"attention: shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)}, query_start_loc "
                         f"{tuple(query_start_loc.shape)}, seq_lens {tuple(seq_lens.shape)}, block_tables "
                         f"{tuple(block_tables.shape)}")
    sinks, alibi_slopes = _per_head(sinks, nh, "sinks"), _per_head(alibi_slopes, nh, "alibi_slopes")
    out = q.new_empty(rows, nh, hdv)
    rc = lib.orca_attention(
        DTYPES[dtype], q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), k.stride(0), k.stride(1), v.data_ptr(),
        v.stride(0), v.stride(1), slot_mapping.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), bs, nkv, hd, hdv,
        nh, query_start_loc.data_ptr(), seq_lens.data_ptr(), block_tables.data_ptr(), block_tables.stride(0),
        num_reqs, float(scale), int(sliding_window), float(softcap), _ptr(sinks), _ptr(alibi_slopes), out.data_ptr(),
        nh * hdv, hdv, rows, block_tables.shape[1], num_blocks, torch.get_num_threads())
    if rc == -2:
        raise IndexError(f"attention: query_start_loc, seq_lens or block_tables point outside the {rows} query rows "
                         f"/ {num_blocks} cache blocks")
    if rc == -3:
        raise IndexError(f"store_kv: a slot in {slot_mapping.tolist()} is outside the cache's {num_blocks * bs} slots")
    if rc < 0:
        raise MemoryError("attention: the kernel could not allocate its scratch buffers")
    return out


def _attention_checked(q, k, v, k_cache, v_cache, slot_mapping, query_start_loc, seq_lens, block_tables, scale,
                       sliding_window, softcap, sinks, alibi_slopes):
    store_kv(k, v, k_cache, v_cache, slot_mapping)
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    extra = dict(sinks=sinks, alibi_slopes=alibi_slopes)
    if decode_attention(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale, sliding_window,
                        softcap, out, **extra):
        prefill_attention(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale, sliding_window,
                          softcap, out, **extra)
    return out
