"""Triton kernels of ``orca::attention``: the K/V store and ragged paged attention.

Same signature and semantics as :func:`orca_compile.kernels.attention_ref.attention` (the oracle):
this iteration's K/V are written into the paged cache, then every request's queries attend causally
(optionally windowed, soft-capped, ALiBi-biased and with attention sinks) to their whole context,
read from the cache through the request's block table. Two launches per call, independent of the
number of requests.

K/V store (``store_kv``)
    Grid ``(T,)``: one program per new token copies its ``[nkv, hd]`` key and ``[nkv, hdv]`` value
    into slot ``slot_mapping[t]``, i.e. cache row ``(slot // block_size, slot % block_size)``.
    Slots < 0 (padding) are masked off rather than branched on, so no program ever returns early.

Ragged paged attention (``attention``)
    Grid ``(T // BLOCK_Q + R, nkv)`` over *query tiles of the flattened tokens* x KV heads. Request
    r owns the query tiles ``qsl[r] // BLOCK_Q + r`` up to the next request's first tile, a sequence
    that strictly increases with r, so a program finds its request with a binary search over
    ``query_start_loc`` and the grid needs nothing but shapes: the launch never syncs with the
    device (no ``.item()``, no max context length on the host), which keeps it CUDA-graph
    friendly. The bound ``T // BLOCK_Q + R`` covers ``sum_r ceil(q_len_r / BLOCK_Q)``; programs
    past the end of their request (and the single program of an empty request) do nothing.

    Why this grid rather than ``(request, query tile, kv head)``: the latter must be sized by the
    *longest* request, so a batch of 63 decodes and one 2048-token prefill launches 64 x 2048 /
    BLOCK_Q programs of which almost all exit at once; the flattened grid launches about
    ``T / BLOCK_Q + R``, whatever the mix.

    One program handles ``BLOCK_Q`` consecutive query tokens of one request and *all*
    ``nh / nkv`` query heads of one KV group, packed into the ``BLOCK_M = BLOCK_Q * GROUP_PAD`` rows
    of a single tile (row m: token ``m // GROUP_PAD``, head ``m % GROUP_PAD`` of the group), so each
    K/V tile is read once per group and feeds one ``tl.dot`` of M >= 16 rows even for a decode.
    (GQA/MQA is then just a larger group; MHA a group of one.)

    It walks the context in tiles of ``BLOCK_N`` positions with the online softmax of
    flash-attention (running max ``m``, running sum ``l``, rescaled accumulator, exp2 with log2(e)
    folded in), accumulating in float32 whatever the input dtype. The block table is read per key
    position: ``block = block_tables[r, pos // BLOCK_SIZE]`` and the row ``pos % BLOCK_SIZE`` of that
    block, so BLOCK_N and the cache block size are independent (a tile may span several cache
    blocks or a fraction of one) and blocks may lie anywhere in the pool.

    Masking: the loop only visits positions ``lo .. hi`` where ``hi`` is one past the tile's last
    query position (causal: nothing later can be seen) and ``lo`` is the first position the
    tile's earliest query sees under the sliding window (0 without one), so whole tiles above the
    diagonal or out of the window are never loaded. Inside a tile each score is kept iff
    ``k_pos <= q_pos`` and (window) ``k_pos > q_pos - w``; loads past ``hi`` are masked, so padded
    block-table entries are never dereferenced. The running max starts at a large finite negative
    value instead of -inf so that a row with nothing visible yet (possible under a window) gets a
    rescale factor of 1 rather than ``exp(-inf + inf) = nan``. Head dims are padded to powers of two
    (at least 16, the minimum of ``tl.dot``) and masked, so 80 or 96 work, and k and v head dims may
    differ.

    ALiBi and sinks are constexpr switches (``USE_ALIBI``, ``USE_SINKS``), so the kernel without them
    is the plain one. ALiBi adds ``slope_h * (k_pos - q_pos)`` to each score after soft-cap, before
    masking. A sink is a logit that attends to no value: the online softmax starts from it instead
    of from nothing (``m = sink``, ``l = 1``, ``acc = 0``), so it joins every later maximum and the
    sum, and the final ``acc / l`` is the sink's normalisation. Sinks and slopes are read per query
    head (row ``m`` of a tile: head ``kvh * GROUP + m % GROUP_PAD``) in float32, the accumulation
    precision, whatever the model's dtype.

    Soft-cap uses ``tanh(x) = sign(x) (1 - e^{-2|x|}) / (1 + e^{-2|x|})`` built from ``exp``: libdevice's
    ``tanh`` has no implementation in Triton's interpreter, which the CPU tests run on. Its absolute
    error is a float32 ulp, i.e. ``softcap * 6e-8`` on a score.

Not done (yet): splitting long contexts over several programs (flash-decoding). A decode-only
batch launches ``R x nkv`` programs that each walk a whole context; with few requests that leaves
SMs idle (64 decodes x 8 KV heads = 512 programs on 132 SMs is fine, 4 x 8 is not).

Dtypes: float16, bfloat16, float32 (float32 dots use ``input_precision="ieee"``, not TF32, so the
float32 path matches the reference to float32 rounding). K/V are read in the cache dtype and
converted to q's (as the reference does); the probabilities are rounded to q's dtype before
``P @ V``, as flash-attention does, so both dots of a half-precision call run on tensor cores. float64 has no ``tl.dot`` and is not a serving dtype:
it falls back to the torch reference (which is what every float64 test and the CPU path use anyway).

Interpreter (``TRITON_INTERPRET=1``): the CPU tests run these kernels in Triton's interpreter. The
variable must be set before triton is first imported, because triton's own library functions
(``tl.sum``, ``tl.max``, ``tl.zeros``) are jitted when ``triton.language`` is imported and a
compiled-mode one cannot be called from interpreted code; a late setting is reported by a clear
error rather than triton's "Cannot call @triton.jit'd outside of the scope of a kernel". Our own
kernels are jitted lazily, once per mode, so importing this module does not fix the mode. The
interpreter (triton 3.9) multiplies bfloat16 tiles as raw 16-bit integers, so there, and only there,
dot operands are widened to float32 after their rounding to the input dtype; the masking and
indexing under test are unchanged.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from orca_compile.kernels import attention_ref

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MIN_DOT = 16  # smallest M, N and K of tl.dot


def _store_kv_fn(
    K, V, K_CACHE, V_CACHE, SLOTS,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_kcb, stride_kcs, stride_kch, stride_kcd,
    stride_vcb, stride_vcs, stride_vch, stride_vcd,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, HEADS_PAD: tl.constexpr, DIM_PAD: tl.constexpr, DIM_V_PAD: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + t).to(tl.int64)
    block = slot // BLOCK_SIZE
    row = slot % BLOCK_SIZE
    h = tl.arange(0, HEADS_PAD)[:, None]
    # broadcast before comparing: the interpreter turns `scalar bool & block bool` into integers
    keep = (h * 0 + slot) >= 0
    d = tl.arange(0, DIM_PAD)[None, :]
    m = keep & (h < NUM_KV_HEADS) & (d < HEAD_DIM)
    x = tl.load(K + t * stride_kt + h * stride_kh + d * stride_kd, mask=m)
    tl.store(K_CACHE + block * stride_kcb + row * stride_kcs + h * stride_kch + d * stride_kcd,
             x.to(K_CACHE.dtype.element_ty), mask=m)
    dv = tl.arange(0, DIM_V_PAD)[None, :]
    mv = keep & (h < NUM_KV_HEADS) & (dv < HEAD_DIM_V)
    y = tl.load(V + t * stride_vt + h * stride_vh + dv * stride_vd, mask=mv)
    tl.store(V_CACHE + block * stride_vcb + row * stride_vcs + h * stride_vch + dv * stride_vcd,
             y.to(V_CACHE.dtype.element_ty), mask=mv)


def _paged_attention_fn(
    Q, K_CACHE, V_CACHE, OUT, QSL, SEQ_LENS, BLOCK_TABLES, SINKS, ALIBI_SLOPES,
    scale, softcap, window, num_reqs,
    stride_qt, stride_qh, stride_qd,
    stride_kcb, stride_kcs, stride_kch, stride_kcd,
    stride_vcb, stride_vcs, stride_vch, stride_vcd,
    stride_ot, stride_oh, stride_od,
    stride_btr, stride_btb,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, DIM_PAD: tl.constexpr, DIM_V_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_SINKS: tl.constexpr, USE_ALIBI: tl.constexpr,
    DOT_PRECISION: tl.constexpr, WIDEN_DOT: tl.constexpr,
):
    tile = tl.program_id(0)
    kvh = tl.program_id(1).to(tl.int64)

    # request r: the last one whose first tile, qsl[r] // BLOCK_Q + r (strictly increasing in r),
    # is <= this tile; binary search for the first request past it
    left: tl.int32 = 0
    right = num_reqs
    while left < right:
        mid = (left + right) // 2
        first = (tl.load(QSL + mid) // BLOCK_Q + mid).to(tl.int32)
        if first <= tile:
            left = mid + 1
        else:
            right = mid
    r = left - 1
    q_start = tl.load(QSL + r)
    q_len = (tl.load(QSL + r + 1) - q_start).to(tl.int32)
    q_tile = tile - (q_start // BLOCK_Q + r).to(tl.int32)
    if q_tile * BLOCK_Q < q_len:
        seq_len = tl.load(SEQ_LENS + r).to(tl.int32)
        offs_m = tl.arange(0, BLOCK_M)
        q_idx = q_tile * BLOCK_Q + offs_m // GROUP_PAD  # index within the request's queries
        g = offs_m % GROUP_PAD
        row_ok = (q_idx < q_len) & (g < GROUP)
        token = (q_start + q_idx).to(tl.int64)
        head = kvh * GROUP + g
        q_pos = seq_len - q_len + q_idx  # position of each query row in its context

        d = tl.arange(0, DIM_PAD)
        dv = tl.arange(0, DIM_V_PAD)
        q = tl.load(Q + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :] * stride_qd,
                    mask=row_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
        if WIDEN_DOT:
            q = q.to(tl.float32)

        # keys the tile can see: up to its last query; from its first query's window start
        first_q_pos = seq_len - q_len + q_tile * BLOCK_Q
        hi = seq_len - q_len + tl.minimum(q_len, (q_tile + 1) * BLOCK_Q)
        lo = 0
        if USE_WINDOW:
            lo = tl.maximum(first_q_pos - window + 1, 0)

        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        if USE_SINKS:  # the sink as a key already seen: its exp2(sink - m_i) = 1 is the running sum
            m_i = tl.load(SINKS + head, mask=row_ok, other=0.0) * 1.4426950408889634
            l_i = tl.full([BLOCK_M], 1.0, tl.float32)
        if USE_ALIBI:
            slope = tl.load(ALIBI_SLOPES + head, mask=row_ok, other=0.0)
        acc = tl.zeros([BLOCK_M, DIM_V_PAD], tl.float32)
        bt_row = BLOCK_TABLES + r * stride_btr
        for start in range(lo, hi, BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)
            pos_ok = pos < hi
            block = tl.load(bt_row + (pos // BLOCK_SIZE) * stride_btb, mask=pos_ok, other=0).to(tl.int64)
            row = (pos % BLOCK_SIZE).to(tl.int64)
            k = tl.load(K_CACHE + block[None, :] * stride_kcb + row[None, :] * stride_kcs + kvh * stride_kch
                        + d[:, None] * stride_kcd,
                        mask=pos_ok[None, :] & (d[:, None] < HEAD_DIM), other=0.0)
            k = k.to(Q.dtype.element_ty)
            if WIDEN_DOT:
                k = k.to(tl.float32)
            s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale
            if USE_SOFTCAP:
                x = s / softcap
                e = tl.exp(-2.0 * tl.abs(x))
                th = (1.0 - e) / (1.0 + e)
                s = softcap * tl.where(x < 0, -th, th)
            if USE_ALIBI:
                s += slope[:, None] * (pos[None, :] - q_pos[:, None]).to(tl.float32)
            visible = pos_ok[None, :] & (pos[None, :] <= q_pos[:, None])
            if USE_WINDOW:
                visible = visible & (pos[None, :] > q_pos[:, None] - window)
            s = tl.where(visible, s * 1.4426950408889634, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)

            v = tl.load(V_CACHE + block[:, None] * stride_vcb + row[:, None] * stride_vcs + kvh * stride_vch
                        + dv[None, :] * stride_vcd,
                        mask=pos_ok[:, None] & (dv[None, :] < HEAD_DIM_V), other=0.0)
            v = v.to(Q.dtype.element_ty)
            p = p.to(Q.dtype.element_ty)
            if WIDEN_DOT:
                v = v.to(tl.float32)
                p = p.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
            m_i = m_new

        # every real row sees at least its own key (or has its sink), so l > 0 there; padding rows
        # are not stored
        out = acc / tl.where(row_ok, l_i, 1.0)[:, None]
        tl.store(OUT + token[:, None] * stride_ot + head[:, None] * stride_oh + dv[None, :] * stride_od,
                 out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < HEAD_DIM_V))


_KERNELS: dict[bool, tuple] = {}


def _interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


def _kernels():
    """(store_kv, paged_attention), jitted for the current mode (compiled or interpreted)."""
    mode = _interpreting()
    from triton.runtime.interpreter import InterpretedFunction

    if mode != isinstance(tl.zeros, InterpretedFunction):
        raise RuntimeError(
            f"TRITON_INTERPRET is {'on' if mode else 'off'} now but was {'off' if mode else 'on'} when triton "
            "was first imported; set it before anything imports triton (for the tests: tests/kernels/conftest.py)")
    if mode not in _KERNELS:
        # ints equal to 1 are otherwise specialised into constants; a single request or a window
        # of 1 is ordinary data, not worth a recompile
        _KERNELS[mode] = (triton.jit(_store_kv_fn),
                          triton.jit(_paged_attention_fn, do_not_specialize=["window", "num_reqs"]))
    return _KERNELS[mode]


def _pow2(n: int, at_least: int = 1) -> int:
    return max(triton.next_power_of_2(n), at_least)


def _check_device(t: torch.Tensor):
    if t.device.type == "cpu" and not _interpreting():
        raise RuntimeError("the Triton attention kernels got CPU tensors: run on a GPU, or set "
                           "TRITON_INTERPRET=1 (before triton is imported) to interpret them on the CPU")


def _on(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def store_kv(k, v, k_cache, v_cache, slot_mapping):
    """Write this iteration's K/V into the paged cache; slots < 0 are skipped."""
    _check_device(k)
    num_tokens, nkv, hd = k.shape
    hdv = v.shape[-1]
    if num_tokens == 0:
        return
    store, _ = _kernels()
    with _on(k):
        store[(num_tokens,)](
            k, v, k_cache, v_cache, slot_mapping,
            *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
            NUM_KV_HEADS=nkv, HEAD_DIM=hd, HEAD_DIM_V=hdv, BLOCK_SIZE=k_cache.shape[1],
            HEADS_PAD=_pow2(nkv), DIM_PAD=_pow2(hd), DIM_V_PAD=_pow2(hdv),
        )


def _per_head(t, q, name):
    """Sinks or ALiBi slopes as the kernel reads them: one float32 per query head (the accumulation
    precision), contiguous, on q's device; None stays None (and its constexpr switch off)."""
    if t is None:
        return None
    if t.shape != (q.shape[1],) or t.device != q.device:
        raise ValueError(f"{name} must be one value per query head on {q.device}, shape ({q.shape[1]},); got "
                         f"{tuple(t.shape)} on {t.device}")
    return t.to(torch.float32).contiguous()


def default_config(num_tokens: int, num_reqs: int, group: int, head_dim: int) -> dict:
    """Tile sizes from shapes alone (no device sync). Decode-heavy batches have one query per
    request, so a query tile of more than the KV group's heads would be mostly padding; prefill-heavy
    ones have long runs of queries and want a tall tile to reuse each K/V tile across many rows."""
    group_pad = _pow2(group)
    prefill_heavy = num_tokens >= 16 * max(num_reqs, 1)
    block_m = max(64 if prefill_heavy else _MIN_DOT, group_pad)
    block_n = 64 if head_dim <= 128 else 32
    return dict(block_m=block_m, block_n=block_n, num_warps=4, num_stages=2)


def attention(q, k, v, k_cache, v_cache, slot_mapping, query_start_loc, seq_lens, block_tables,
              scale, sliding_window=0, softcap=0.0, sinks=None, alibi_slopes=None, *, block_m=None, block_n=None,
              num_warps=None, num_stages=None):
    """``orca::attention`` with Triton kernels; returns ``[T, nh, v_head_dim]`` in q's dtype.

    ``sinks`` and ``alibi_slopes`` ([nh] each, any float dtype, or None) are read in float32. The
    keyword-only tile arguments override :func:`default_config` (tests and the benchmark use them);
    ``block_m`` is rounded up to the KV group size padded to a power of two."""
    if torch.float64 in (q.dtype, k_cache.dtype, v_cache.dtype):
        return attention_ref.attention(q, k, v, k_cache, v_cache, slot_mapping, query_start_loc, seq_lens,
                                       block_tables, scale, sliding_window, softcap, sinks, alibi_slopes)
    if q.dtype not in SUPPORTED_DTYPES or k_cache.dtype not in SUPPORTED_DTYPES or v_cache.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"Triton attention supports {', '.join(map(str, SUPPORTED_DTYPES))} (float64 falls back "
                         f"to the reference); got q {q.dtype}, k_cache {k_cache.dtype}, v_cache {v_cache.dtype}")
    num_tokens, nh, hd = q.shape
    _, block_size, nkv, cache_hd = k_cache.shape
    hdv = v.shape[-1]
    if nh % nkv:
        raise ValueError(f"{nh} query heads are not a multiple of {nkv} KV heads")
    if cache_hd != hd or k.shape[1:] != (nkv, hd):
        raise ValueError(f"head dims disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, k_cache {tuple(k_cache.shape)}")
    if v_cache.shape[:3] != k_cache.shape[:3] or v_cache.shape[-1] != hdv or v.shape[1] != nkv:
        raise ValueError(f"v {tuple(v.shape)} / v_cache {tuple(v_cache.shape)} do not match k_cache {tuple(k_cache.shape)}")
    _check_device(q)
    sinks, alibi_slopes = _per_head(sinks, q, "sinks"), _per_head(alibi_slopes, q, "alibi_slopes")

    store_kv(k, v, k_cache, v_cache, slot_mapping)
    out = q.new_empty(num_tokens, nh, hdv)
    num_reqs = seq_lens.shape[0]
    if num_tokens == 0 or num_reqs == 0:
        return out

    group = nh // nkv
    cfg = default_config(num_tokens, num_reqs, group, hd)
    group_pad = _pow2(group)
    block_m = max(block_m or cfg["block_m"], group_pad, _MIN_DOT)
    block_m = _pow2(block_m)
    block_n = _pow2(block_n or cfg["block_n"], _MIN_DOT)
    block_q = block_m // group_pad
    interpret = _interpreting()
    launch = {} if interpret else dict(num_warps=num_warps or cfg["num_warps"],
                                       num_stages=num_stages or cfg["num_stages"])
    _, paged = _kernels()
    grid = (num_tokens // block_q + num_reqs, nkv)
    with _on(q):
        paged[grid](
            q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables, sinks, alibi_slopes,
            float(scale), float(softcap) if softcap else 1.0, int(sliding_window), num_reqs,
            *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(), *block_tables.stride(),
            GROUP=group, GROUP_PAD=group_pad,
            HEAD_DIM=hd, HEAD_DIM_V=hdv, DIM_PAD=_pow2(hd, _MIN_DOT), DIM_V_PAD=_pow2(hdv, _MIN_DOT),
            BLOCK_SIZE=block_size, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n,
            USE_WINDOW=bool(sliding_window), USE_SOFTCAP=bool(softcap),
            USE_SINKS=sinks is not None, USE_ALIBI=alibi_slopes is not None,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            WIDEN_DOT=interpret and q.dtype == torch.bfloat16,
            **launch,
        )
    return out
