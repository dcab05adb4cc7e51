"""The torch reference of orca.attention against a dense per-request computation."""
import math

import pytest
import torch

from orca_compile.kernels import attention_cpu, attention_ref

IMPLS = {"reference": attention_ref.attention, "C decode kernel": attention_cpu.attention}


def _dense(q, k, v, scale, window, softcap):
    """One request, its whole context in k/v (positions 0..L-1), queries at the last q positions."""
    lq, lk = q.shape[0], k.shape[0]
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    qp = torch.arange(lk - lq, lk)[:, None]
    kp = torch.arange(lk)[None]
    ok = (kp <= qp) & ((kp > qp - window) if window else True)
    s = s.masked_fill(~ok, float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("nh,nkv", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("window,softcap", [(0, 0.0), (5, 0.0), (0, 20.0)])
def test_matches_dense(impl, nh, nkv, window, softcap):
    """The whole op (store, decodes, fresh and chunked prefills, an empty request) of the
    reference and of the C decode path against a dense per-request computation."""
    if impl == "C decode kernel" and not attention_cpu.available():
        # reason: no C compiler here; on Linux with one, test_attention_cpu asserts it builds
        pytest.skip(f"C decode kernel not built: {attention_cpu.why_unavailable()}")
    attention = IMPLS[impl]
    g = torch.Generator().manual_seed(0)
    hd, bs, nb = 8, 4, 32
    # (cached, new): decodes, prefills, a chunk on top of a context, an empty request
    reqs = [(0, 7), (9, 1), (3, 5), (12, 0), (0, 1), (6, 1)]
    kc = torch.zeros(nb, bs, nkv, hd, dtype=torch.float64)
    vc = torch.zeros_like(kc)
    perm = torch.randperm(nb, generator=g).tolist()
    tables, full_k, full_v = [], [], []
    for cached, new in reqs:
        n = cached + new
        table = [perm.pop() for _ in range(max(1, -(-n // bs)))]
        tables.append(table)
        fk = torch.randn(n, nkv, hd, generator=g, dtype=torch.float64)
        fv = torch.randn(n, nkv, hd, generator=g, dtype=torch.float64)
        for p in range(cached):  # the context already cached
            kc[table[p // bs], p % bs], vc[table[p // bs], p % bs] = fk[p], fv[p]
        full_k.append(fk)
        full_v.append(fv)
    q = torch.randn(sum(n for _, n in reqs), nh, hd, generator=g, dtype=torch.float64)
    k = torch.cat([fk[c:] for fk, (c, _) in zip(full_k, reqs)])
    v = torch.cat([fv[c:] for fv, (c, _) in zip(full_v, reqs)])
    qsl = torch.tensor([0] + [n for _, n in reqs]).cumsum(0)
    slots = torch.tensor([tables[r][p // bs] * bs + p % bs for r, (c, n) in enumerate(reqs) for p in range(c, c + n)])
    bt = torch.zeros(len(reqs), max(map(len, tables)), dtype=torch.long)
    for r, t in enumerate(tables):
        bt[r, : len(t)] = torch.tensor(t)
    seq_lens = torch.tensor([c + n for c, n in reqs])
    scale = 1 / math.sqrt(hd)
    out = attention(q, k, v, kc, vc, slots, qsl, seq_lens, bt, scale, window, softcap)
    for r, (c, n) in enumerate(reqs):
        if n:
            want = _dense(q[qsl[r]:qsl[r + 1]], full_k[r], full_v[r], scale, window, softcap)
            torch.testing.assert_close(out[qsl[r]:qsl[r + 1]], want, atol=1e-12, rtol=0)
    # the new K/V landed in their slots
    torch.testing.assert_close(kc.view(-1, nkv, hd)[slots], k)


def test_padding_slots_are_not_written():
    kc = torch.zeros(2, 4, 1, 2)
    vc = torch.zeros_like(kc)
    q = torch.ones(2, 1, 2)
    k = torch.full((2, 1, 2), 3.0)
    attention_ref.attention(q, k, k, kc, vc, torch.tensor([1, -1]), torch.tensor([0, 1, 2]), torch.tensor([2, 1]),
              torch.tensor([[0], [1]]), 1.0)
    assert kc.view(-1, 1, 2)[1].eq(3).all() and kc.count_nonzero() == 2
