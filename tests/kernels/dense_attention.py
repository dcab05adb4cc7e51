"""A naive oracle of ``orca::attention`` for the kernel tests, and a batch to feed it.

The oracle is the formula of ``orca_compile/ops.py`` written out once per request, query head and
query, with the positions explicit and everything in float64: no masks, no gathers, no batching,
nothing shared with the implementations under test.
"""
import torch

# (cached, new) per request: a prompt across blocks, decodes (one on a context longer than a
# Triton KV tile of 64, one at position 0), a short prompt, an empty request, and chunks of a
# prompt on top of a cached context (one longer than a window, one crossing the C kernel's blocks
# of 6 query rows)
MIXED = [(0, 7), (9, 1), (3, 5), (12, 0), (0, 1), (6, 1), (17, 12), (70, 1), (5, 2)]


def per_head(nh, low, high, seed):
    """nh float64 values in [low, high], in a shuffled order so that GQA groups mix them."""
    g = torch.Generator().manual_seed(seed)
    return torch.linspace(low, high, nh, dtype=torch.float64)[torch.randperm(nh, generator=g)]


def dense_attention(q, k, v, scale, window=0, softcap=0.0, sinks=None, alibi_slopes=None):
    """One request: q [n, nh, hd] its new tokens' queries, k/v [L, nkv, *] its whole context
    (positions 0 .. L-1); the queries sit at positions L-n .. L-1. Returns [n, nh, hdv] float64."""
    n, nh, _ = q.shape
    ctx, nkv, hdv = v.shape
    q, k, v = q.double(), k.double(), v.double()
    out = torch.empty(n, nh, hdv, dtype=torch.float64)
    for h in range(nh):
        kvh = h // (nh // nkv)
        for i in range(n):
            p_i = ctx - n + i
            keys = torch.tensor([p_j for p_j in range(ctx) if p_j <= p_i and (not window or p_j > p_i - window)])
            s = scale * (k[keys, kvh] @ q[i, h])
            if softcap:
                s = softcap * torch.tanh(s / softcap)
            if alibi_slopes is not None:
                s = s + float(alibi_slopes[h]) * (keys - p_i).double()
            m = s.max()
            if sinks is not None:
                m = torch.maximum(m, sinks[h].double())
            weights = torch.exp(s - m)
            denominator = weights.sum() + (torch.exp(sinks[h].double() - m) if sinks is not None else 0.0)
            out[i, h] = weights @ v[keys, kvh] / denominator
    return out


def paged_batch(reqs, nh, nkv, hd, hdv, bs, dtype, seed=0, device="cpu"):
    """Inputs of ``orca::attention`` for ``reqs`` ((cached, new) per request), each request's blocks
    scattered over the pool and its cached context already in the cache (the rest of the pool is
    garbage; block table padding is -1, never to be read), plus each request's whole context
    [L, nkv, *] for the oracle. Values are drawn in float64 and rounded to ``dtype`` once, so the
    oracle sees exactly what the kernels see.

    Returns (args, contexts): args = [q, k, v, k_cache, v_cache, slot_mapping, query_start_loc,
    seq_lens, block_tables], contexts = [(k_ctx, v_ctx)] per request."""
    g = torch.Generator().manual_seed(seed)
    tables, used = [], 0
    for cached, new in reqs:
        tables.append(list(range(used, used + max(1, -(-(cached + new) // bs)))))
        used += len(tables[-1])
    nb = used + 3
    perm = torch.randperm(nb, generator=g).tolist()
    tables = [[perm[b] for b in t] for t in tables]
    kc = torch.randn(nb, bs, nkv, hd, generator=g, dtype=torch.float64).to(dtype)
    vc = torch.randn(nb, bs, nkv, hdv, generator=g, dtype=torch.float64).to(dtype)
    contexts = []
    for (cached, new), table in zip(reqs, tables):
        ck = torch.randn(cached + new, nkv, hd, generator=g, dtype=torch.float64).to(dtype)
        cv = torch.randn(cached + new, nkv, hdv, generator=g, dtype=torch.float64).to(dtype)
        for p in range(cached):
            kc[table[p // bs], p % bs], vc[table[p // bs], p % bs] = ck[p], cv[p]
        contexts.append((ck, cv))
    q = torch.randn(sum(n for _, n in reqs), nh, hd, generator=g, dtype=torch.float64).to(dtype)
    k = torch.cat([ck[c:] for (ck, _), (c, _) in zip(contexts, reqs)])
    v = torch.cat([cv[c:] for (_, cv), (c, _) in zip(contexts, reqs)])
    slots = torch.tensor([tables[r][p // bs] * bs + p % bs for r, (c, n) in enumerate(reqs) for p in range(c, c + n)],
                         dtype=torch.long)
    qsl = torch.tensor([0] + [n for _, n in reqs]).cumsum(0)
    bt = torch.full((len(reqs), max(map(len, tables))), -1, dtype=torch.long)
    for r, t in enumerate(tables):
        bt[r, : len(t)] = torch.tensor(t)
    seq_lens = torch.tensor([c + n for c, n in reqs])
    args = [q, k, v, kc, vc, slots, qsl, seq_lens, bt]
    return [a.to(device) for a in args], contexts


def dense_batch(q, qsl, contexts, scale, window=0, softcap=0.0, sinks=None, alibi_slopes=None):
    """``dense_attention`` of every request of a ``paged_batch``: [T, nh, hdv] float64."""
    hdv = contexts[0][1].shape[-1]
    out = torch.empty(q.shape[0], q.shape[1], hdv, dtype=torch.float64)
    q = q.cpu()
    for r, (ck, cv) in enumerate(contexts):
        a, b = int(qsl[r]), int(qsl[r + 1])
        if b > a:
            out[a:b] = dense_attention(q[a:b], ck, cv, scale, window, softcap, sinks, alibi_slopes)
    return out
