"""``orca::expert_linear``: the experts of a mixture-of-experts layer, tokens grouped by expert.

Every token picked ``k`` experts (its row of ``expert_ids``); each pair (token, slot) multiplies its
input row by its expert's weight. The pairs are sorted by expert (stable, so equal experts keep
token order), each expert with at least one pair runs one GEMM over its rows, and the results go
back to the pairs' places: ``E_active`` GEMMs of the pairs an expert got, instead of HF eager's
one-hot mask and per-expert ``where``, or a GEMM per pair. The same torch code runs on CPU and
CUDA; routing is per token, so a batch of many requests needs nothing but its flat rows.
"""
from __future__ import annotations

import torch


def expert_linear(x: torch.Tensor, expert_ids: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  transposed: bool) -> torch.Tensor:
    """x ``[T, K]`` (one input per token) or ``[T, k, K]`` (one per pair); expert_ids ``[T, k]``;
    weight ``[E, N, K]`` (``[E, K, N]`` when ``transposed``); bias ``[E, N]`` or None
    -> ``[T, k, N]``: ``out[t, s] = x[t(, s)] @ W[e]^T + b[e]`` with ``e = expert_ids[t, s]``."""
    tokens, top_k = expert_ids.shape
    num_experts = weight.shape[0]
    n = weight.shape[2] if transposed else weight.shape[1]
    pairs = tokens * top_k
    ids = expert_ids.reshape(pairs)
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=num_experts).tolist()  # the one host sync of the op
    if len(counts) > num_experts:
        raise IndexError(f"expert_linear: an expert id in {ids.tolist()} is outside the {num_experts} experts")
    rows = order if x.dim() == 3 else order // top_k
    xs = x.reshape(-1, x.shape[-1]).index_select(0, rows)
    if xs.dtype != weight.dtype:
        xs = xs.to(weight.dtype)
    out = xs.new_empty(pairs, n)
    start = 0
    for e, count in enumerate(counts):
        if not count:
            continue
        stop = start + count
        w = weight[e] if transposed else weight[e].t()
        if bias is None:
            torch.mm(xs[start:stop], w, out=out[start:stop])
        else:
            torch.addmm(bias[e], xs[start:stop], w, out=out[start:stop])
        start = stop
    return torch.empty_like(out).index_copy_(0, order, out).view(tokens, top_k, n)
