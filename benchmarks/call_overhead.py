"""Python cost of one call of each C kernel wrapper the lowered graph calls, on inputs so small that
the C work is next to nothing, against the bare ctypes call (and, for attention, the three checked
calls it replaced; for add + layer norm, the two ATen ops it replaces). One W1 decode step makes
49 linear, 12 attention and 25 add + layer norm calls.

    python benchmarks/call_overhead.py
"""
from __future__ import annotations

import time

import torch

from orca_compile.kernels import attention_cpu, gemm_cpu, norm_cpu

aten = torch.ops.aten


def per_call_us(fn, n=20000):
    for _ in range(200):
        fn()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n * 1e6)
    return best


def main():
    for mod in (gemm_cpu, attention_cpu, norm_cpu):
        if not mod.available():
            raise SystemExit(f"{mod.__name__}: {mod.why_unavailable()}")
    threads = torch.get_num_threads()
    rows = []

    w, b, x = gemm_cpu.pack(torch.randn(16, 16)), torch.randn(16), torch.randn(1, 16)
    out = torch.empty(1, 16)
    lib = gemm_cpu.LIB.load()
    rows.append(("linear, 1 x 16 -> 16", per_call_us(lambda: gemm_cpu.linear(x, w, b, 16, 0)),
                 "bare orca_gemm", per_call_us(lambda: lib.orca_gemm(0, x.data_ptr(), 16, w.data_ptr(), b.data_ptr(),
                                                                   out.data_ptr(), 16, 1, 16, 16, 0, threads))))

    kc, vc = torch.zeros(4, 16, 12, 64), torch.zeros(4, 16, 12, 64)
    q, k, v = (torch.randn(1, 12, 64) for _ in range(3))
    meta = (torch.tensor([0]), torch.tensor([0, 1]), torch.tensor([1]), torch.tensor([[0]]))
    rows.append(("attention, one decode of one token", per_call_us(lambda: attention_cpu.attention(q, k, v, kc, vc,
                                                                                                   *meta, 0.125)),
                 "store_kv + decode_attention + prefill_attention, each checked",
                 per_call_us(lambda: attention_cpu._attention_checked(q, k, v, kc, vc, *meta, 0.125, 0, 0.0))))

    h, lw, lb = torch.randn(1, 768), torch.randn(768), torch.randn(768)
    rows.append(("add_layer_norm, 1 x 768", per_call_us(lambda: norm_cpu.add_layer_norm(h, h, lw, lb, 1e-5)),
                 "aten add + layer_norm",
                 per_call_us(lambda: aten.layer_norm.default(aten.add.Tensor(h, h), [768], lw, lb, 1e-5, False))))
    print(f"torch threads {threads}; best of 3 x 20000 calls")
    for name, us, base, base_us in rows:
        print(f"  {name}: {us:.1f} us a call; {base}: {base_us:.1f} us")


if __name__ == "__main__":
    main()
