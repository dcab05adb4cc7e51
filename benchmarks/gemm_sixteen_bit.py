"""16-bit weights on this CPU: the C GEMM on float32 and on bfloat16 weights against ATen's
bfloat16 and float32 GEMMs (oneDNN / MKL), at a decode's and a prefill's row counts, on Qwen2.5-0.5B's
MLP up projection (896 -> 4864). The figures behind docs/benchmarks.md's W2 section: whether the
CPU's own 16-bit matrix units (AMX) make ATen's bfloat16 path the faster one here.

    python benchmarks/gemm_sixteen_bit.py [--rows 8 512] [--reps 10]

Each variant is timed after one warm-up call, the mean of ``--reps`` calls; the weights (17 MB in
float32) stay in cache between calls, so the decode row count measures arithmetic, not DRAM.
"""
from __future__ import annotations

import argparse
import time

import torch

from orca_compile.compiler import native_sixteen_bit_matmul
from orca_compile.kernels import gemm_cpu


def timed(fn, reps: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[8, 512])
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args()
    torch.manual_seed(0)
    k, n = 896, 4864
    w = torch.randn(n, k)
    packed32, packed16 = gemm_cpu.pack(w), gemm_cpu.pack(w, torch.bfloat16)
    w16 = w.bfloat16()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bfloat16 matrix units (AMX): "
          f"{native_sixteen_bit_matmul(torch.bfloat16)}; {k} -> {n}")
    for m in args.rows:
        x = torch.randn(m, k)
        x16 = x.bfloat16()
        flops = 2 * m * k * n
        for name, fn in (("C GEMM, float32 weights", lambda: gemm_cpu.linear(x, packed32, None, n)),
                         ("C GEMM, bfloat16 weights", lambda: gemm_cpu.linear(x, packed16, None, n)),
                         ("ATen bfloat16 (oneDNN)", lambda: torch.nn.functional.linear(x16, w16)),
                         ("ATen float32 (MKL)", lambda: torch.nn.functional.linear(x, w))):
            s = timed(fn, args.reps)
            print(f"  {m:4d} rows  {name:26} {s * 1e3:8.2f} ms  {flops / s / 1e9:7.0f} GFLOP/s")


if __name__ == "__main__":
    main()
