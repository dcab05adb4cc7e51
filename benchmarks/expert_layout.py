"""The experts' weight layout on the CPU (docs/benchmarks.md, "Mixture of experts on this CPU").

Times the up projection of one Mixtral-shaped MoE layer at a decode's size (32 tokens, top 2 of 8
experts, hidden 512, intermediate 1024, float32): ``orca.expert_linear`` on HF's ``[E, out, in]``
weights against the ``[E, in, out]`` copy the CPU lowering lays out, and the bare per-expert
GEMMs of each layout; then, with ``--decode``, how much of a 32-request decode iteration of
``mixtral-small-random`` (compiled for the ``cpu`` backend) is spent in the experts.

    python benchmarks/expert_layout.py [--decode]
"""
from __future__ import annotations

import argparse
import time

import torch

from orca_compile.kernels import experts


def _ms(fn, n=50):
    for _ in range(5):
        fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e3


def layer(tokens=32, top_k=2, num_experts=8, hidden=512, inter=1024):
    torch.manual_seed(0)
    x = torch.randn(tokens, hidden)
    ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(tokens)])
    w = torch.randn(num_experts, 2 * inter, hidden)  # HF's [E, out, in]
    wt = w.transpose(1, 2).contiguous()  # the lowering's [E, in, out]
    rows = torch.randn(tokens * top_k // num_experts, hidden)
    print(f"up projection, {tokens} tokens x top {top_k} of {num_experts} experts, {w.numel() * 4 / 1e6:.1f} MB:")
    print(f"  {num_experts} x mm, [out, in] read transposed   {_ms(lambda: [torch.mm(rows, w[e].t()) for e in range(num_experts)]):6.2f} ms")
    print(f"  {num_experts} x mm, [in, out] laid out          {_ms(lambda: [torch.mm(rows, wt[e]) for e in range(num_experts)]):6.2f} ms")
    print(f"  expert_linear on [out, in]             {_ms(lambda: experts.expert_linear(x, ids, w, None, False)):6.2f} ms")
    print(f"  expert_linear on [in, out]             {_ms(lambda: experts.expert_linear(x, ids, wt, None, True)):6.2f} ms")


def decode_share():
    import orca_compile
    from orca_compile.presets import load_model
    from orca_compile.runtime.batch import RaggedBatch
    from orca_compile.runtime.kv_cache import new_kv_cache
    from orca_compile.runtime.model_runner import run_graph

    torch.manual_seed(0)
    cm = orca_compile.compile(load_model("mixtral-small-random", dtype=torch.float32), backend="cpu")
    bs, n = 16, 32
    cache = new_kv_cache(cm, 12 * n + 8, bs)
    tables = [list(range(i * 12, i * 12 + 12)) for i in range(n)]
    run_graph(cm, RaggedBatch.build([torch.randint(0, 32000, (60,)).tolist() for _ in range(n)], [0] * n, tables, bs),
              cache)
    batch = RaggedBatch.build([[5]] * n, [60] * n, tables, bs)
    step = _ms(lambda: run_graph(cm, batch, cache), n=10)
    spent = [0.0]
    plain = experts.expert_linear

    def timed(*args):
        start = time.perf_counter()
        try:
            return plain(*args)
        finally:
            spent[0] += time.perf_counter() - start
    experts.expert_linear = timed
    try:
        _ms(lambda: run_graph(cm, batch, cache), n=10)
    finally:
        experts.expert_linear = plain
    print(f"decode iteration of {n} requests: {step:.1f} ms, of which the experts "
          f"{spent[0] / 15 * 1e3:.1f} ms")  # 5 warm-up + 10 timed calls


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--decode", action="store_true", help="also the experts' share of a decode iteration")
    args = p.parse_args()
    layer()
    if args.decode:
        decode_share()
