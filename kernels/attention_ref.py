"""Reference implementation of ``orca::attention`` in plain torch.

It is the CPU path and the oracle for the Triton kernels. No Python loop runs over tokens: all
single-token (decode) requests of the iteration are attended in one batched computation, and each
multi-token (prefill or prefill-chunk) request in one dense computation against its own context.
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


def _attend(q, k, v, allowed, scale, softcap):
    """q [N, Lq, nh, hd], k/v [N, Lk, nkv, hd], allowed [N, Lq, Lk] -> [N, Lq, nh, hdv]."""
    if not softcap and k.shape[-1] == v.shape[-1]:
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
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("nkgql,nlkd->nqkgd", probs, v.to(q.dtype))
    return out.reshape(n, lq, nh, v.shape[-1])


def _allowed(q_pos, k_pos, seq_lens, sliding_window):
    """Causal (and windowed) visibility: [N, Lq] query positions x [Lk] key positions."""
    allowed = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos[None, None, :] < seq_lens[:, None, None])
    if sliding_window:
        allowed &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
    return allowed


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
              scale, sliding_window=0, softcap=0.0):
    store_kv(k, v, k_cache, v_cache, slot_mapping)
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    attend_decodes(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale, sliding_window, softcap, out)
    attend_prefills(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale, sliding_window, softcap, out,
                    k=k, v=v)
    return out


def attend_decodes(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale, sliding_window, softcap,
                   out):
    """Fill ``out``'s rows of the one-token requests: length buckets, each one batched SDPA."""
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
        k_pos = torch.arange(max_len, device=device)
        allowed = _allowed((d_lens - 1)[:, None], k_pos, d_lens, sliding_window)
        out[rows] = _attend(q[rows][:, None], k_ctx, v_ctx, allowed, scale, softcap)[:, 0]


def attend_prefills(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale, sliding_window, softcap,
                    out, k=None, v=None):
    """Fill ``out``'s rows of the multi-token requests, each against its own context.

    A request with no cached context (a whole prompt, or its first chunk) attends over this
    iteration's ``k``/``v`` when they are given: no gather from the cache and no mask tensor, just
    causal SDPA (where there is no window or soft-cap)."""
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    device = q.device
    plain = not sliding_window and not softcap and v_cache.shape[-1] == k_cache.shape[-1]
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
        q_pos = torch.arange(ctx - n, ctx, device=device)[None]
        allowed = _allowed(q_pos, torch.arange(ctx, device=device), seq_lens[r : r + 1], sliding_window)
        out[starts[r] : starts[r] + n] = _attend(q[None, starts[r] : starts[r] + n], k_ctx, v_ctx, allowed, scale, softcap)[0]
