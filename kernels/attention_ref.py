"""Reference implementation of ``orca::attention`` in plain torch.

It is the CPU path and the oracle for the Triton kernels. No Python loop runs over tokens: all
single-token (decode) requests of the iteration are attended in one batched computation, and each
multi-token (prefill or prefill-chunk) request in one dense computation against its own context.

Semantics (``orca_compile/ops.py``): query i at position p_i scores key j at position p_j (causal,
optionally windowed) as ``softcap(scale * q_i . k_j) + slope_h * (p_j - p_i)``, and its output is
``sum_j exp(s_j - m) v_j / (sum_j exp(s_j - m) + exp(sink_h - m))`` with ``m`` the maximum of the
row's scores and its sink. Without sinks and ALiBi slopes (the usual case) the rows go to PyTorch's
fused SDPA where it applies; with either, to the einsum form, which adds the bias before the mask
and appends the sink as one more logit of the softmax.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def store_kv(k, v, k_cache, v_cache, slot_mapping):
    """Write this iteration's K/V into the paged cache; slots < 0 are padding and are skipped."""
    nkv, hd = k_cache.shape[-2:]
    flat_k = k_cache.view(-1, nkv, hd)
    flat_v = v_cache.view(-1, nkv, v_cache.shape[-1])
    if bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
    flat_k.index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    flat_v.index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def _gather_context(cache, block_tables, max_len):
    """[R, max_blocks] block ids -> [R, max_len, nkv, hd] keys (or values) in position order."""
    num_blocks_needed = -(-max_len // cache.shape[1])
    ids = block_tables[:, :num_blocks_needed].clamp(min=0)
    r, nb = ids.shape
    # index_select copies whole blocks (memcpy per row); advanced indexing, cache[ids], goes element
    # by element and is 3-7x slower on the CPU (benchmarks/cpu_attention.py)
    blocks = cache.reshape(cache.shape[0], -1).index_select(0, ids.reshape(-1))
    return blocks.view(r, nb * cache.shape[1], *cache.shape[2:])[:, :max_len]


def _attend(q, k, v, allowed, scale, softcap, sinks=None, bias=None):
    """q [N, Lq, nh, hd], k/v [N, Lk, nkv, hd], allowed [N, Lq, Lk] -> [N, Lq, nh, hdv]; sinks [nh]
    or None, bias [N, nh, Lq, Lk] (ALiBi, ``_alibi_bias``) or None."""
    if not softcap and sinks is None and bias is None and k.shape[-1] == v.shape[-1]:
        # PyTorch's fused CPU attention reads the gathered K/V through strides (no permuted
        # copy) and groups heads itself: 2.3x faster than the einsum form on W1's decodes.
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.to(q.dtype).transpose(1, 2),
                                             v.to(q.dtype).transpose(1, 2), attn_mask=allowed[:, None],
                                             scale=scale, enable_gqa=k.shape[2] != q.shape[2])
        return out.transpose(1, 2)
    n, lq, nh, hd = q.shape
    nkv = k.shape[2]
    qg = q.reshape(n, lq, nkv, nh // nkv, hd)
    scores = torch.einsum("nqkgd,nlkd->nkgql", qg, k.to(q.dtype)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias.view(n, nkv, nh // nkv, lq, -1)
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    if sinks is None:
        probs = torch.softmax(scores, dim=-1)
    else:
        # the sink is one more logit of every row that attends to no value: as a last column it
        # joins the softmax's max and its sum, and its probability is dropped
        sink = sinks.to(scores.dtype).view(1, nkv, nh // nkv, 1, 1).expand(n, -1, -1, lq, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    out = torch.einsum("nkgql,nlkd->nqkgd", probs, v.to(q.dtype))
    return out.reshape(n, lq, nh, v.shape[-1])


def _allowed(q_pos, k_pos, seq_lens, sliding_window):
    """Causal (and windowed) visibility: [N, Lq] query positions x [Lk] key positions."""
    allowed = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos[None, None, :] < seq_lens[:, None, None])
    if sliding_window:
        allowed &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
    return allowed


def _alibi_bias(slopes, q_pos, k_pos, dtype):
    """ALiBi's ``slope_h * (k_pos - q_pos)`` as [N, nh, Lq, Lk] in ``dtype``; None without slopes.
    q_pos [N, Lq], k_pos [Lk]; slopes are per query head."""
    if slopes is None:
        return None
    distance = (k_pos[None, None, :] - q_pos[:, :, None]).to(dtype)
    return slopes.to(dtype)[None, :, None, None] * distance[:, None]


def _length_buckets(reqs, lens, keep=0.6):
    """Decodes grouped by context length, longest first, each group padded to its own longest:
    a group takes requests down to ``keep`` x its longest, so padding stays under 40% of a group
    while the number of groups grows only with log(longest / shortest)."""
    order = sorted(reqs, key=lambda r: -lens[r])
    buckets = []
    for r in order:
        if buckets and lens[r] >= keep * lens[buckets[-1][0]]:
            buckets[-1].append(r)
        else:
            buckets.append([r])
    return buckets


def attention(q, k, v, k_cache, v_cache, slot_mapping, query_start_loc, seq_lens, block_tables,
              scale, sliding_window=0, softcap=0.0, sinks=None, alibi_slopes=None):
    store_kv(k, v, k_cache, v_cache, slot_mapping)
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    attend_decodes(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale, sliding_window, softcap, out,
                   sinks=sinks, alibi_slopes=alibi_slopes)
    attend_prefills(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale, sliding_window, softcap, out,
                    k=k, v=v, sinks=sinks, alibi_slopes=alibi_slopes)
    return out


def attend_decodes(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale, sliding_window, softcap,
                   out, *, sinks=None, alibi_slopes=None):
    """Fill ``out``'s rows of the one-token requests: length buckets, each one batched SDPA (the
    einsum form with sinks or ALiBi slopes)."""
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    device = q.device
    decode = [r for r in range(len(lens)) if starts[r + 1] - starts[r] == 1]
    for bucket in _length_buckets(decode, lens):
        idx = torch.tensor(bucket, device=device)
        d_lens = seq_lens[idx]
        max_len = lens[bucket[0]]
        k_ctx = _gather_context(k_cache, block_tables[idx], max_len)
        v_ctx = _gather_context(v_cache, block_tables[idx], max_len)
        rows = query_start_loc[idx]
        q_pos, k_pos = (d_lens - 1)[:, None], torch.arange(max_len, device=device)
        allowed = _allowed(q_pos, k_pos, d_lens, sliding_window)
        bias = _alibi_bias(alibi_slopes, q_pos, k_pos, q.dtype)
        out[rows] = _attend(q[rows][:, None], k_ctx, v_ctx, allowed, scale, softcap, sinks, bias)[:, 0]


def attend_prefills(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale, sliding_window, softcap,
                    out, k=None, v=None, *, sinks=None, alibi_slopes=None):
    """Fill ``out``'s rows of the multi-token requests, each against its own context.

    A request with no cached context (a whole prompt, or its first chunk) attends over this
    iteration's ``k``/``v`` when they are given: no gather from the cache and no mask tensor, just
    causal SDPA (where there is no window, soft-cap, sink or ALiBi)."""
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    device = q.device
    plain = (not sliding_window and not softcap and sinks is None and alibi_slopes is None
             and v_cache.shape[-1] == k_cache.shape[-1])
    for r in range(len(lens)):
        n = starts[r + 1] - starts[r]
        if n <= 1:
            continue
        ctx = lens[r]
        if ctx == n and plain and k is not None:
            a, b = starts[r], starts[r] + n
            # 4-D [1, heads, n, hd]: with 3-D inputs the CPU dispatcher falls back to bmm + softmax
            qr, kr, vr = (t[None, a:b].transpose(1, 2) for t in (q, k.to(q.dtype), v.to(q.dtype)))
            out[a:b] = F.scaled_dot_product_attention(qr, kr, vr, is_causal=True, scale=scale,
                                                      enable_gqa=kr.shape[1] != qr.shape[1])[0].transpose(0, 1)
            continue
        k_ctx = _gather_context(k_cache, block_tables[r : r + 1], ctx)
        v_ctx = _gather_context(v_cache, block_tables[r : r + 1], ctx)
        q_pos, k_pos = torch.arange(ctx - n, ctx, device=device)[None], torch.arange(ctx, device=device)
        allowed = _allowed(q_pos, k_pos, seq_lens[r : r + 1], sliding_window)
        bias = _alibi_bias(alibi_slopes, q_pos, k_pos, q.dtype)
        out[starts[r] : starts[r] + n] = _attend(q[None, starts[r] : starts[r] + n], k_ctx, v_ctx, allowed, scale,
                                                 softcap, sinks, bias)[0]
