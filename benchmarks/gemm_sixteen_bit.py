"""16-bit weights on this CPU: the C GEMM on float32 and on bfloat16 weights against ATen's
bfloat16 and float32 GEMMs (oneDNN / MKL), at a decode's and a prefill's row counts, on Qwen2.5-0.5B's
MLP up projection (896 -> 4864). The figures behind docs/benchmarks.md's W2 section: whether the
CPU's own 16-bit matrix units (AMX) make ATen's bfloat16 path the faster one here.

    python benchmarks/gemm_sixteen_bit.py [--rows 8 512] [--reps 10]
    python benchmarks/gemm_sixteen_bit.py --stream [--rows 8] [--reps 5]

Each variant is timed after one warm-up call, the mean of ``--reps`` calls; the weights (17 MB in
float32) stay in cache between calls, so the decode row count measures arithmetic, not DRAM.
``--stream``: every linear weight of Qwen2.5-0.5B (24 layers of Q, K, V, O, gate, up, down, and
the tied LM head: 494 M weights, 988 MB in bfloat16) multiplied in turn, as a decode iteration
does, so the weights come from DRAM: the GEMMs' own share of W2's decode iteration, against the
time to read those bytes at the memory's measured rate.
"""
from __future__ import annotations

import argparse
import time

import torch

from orca_compile.sixteen_bit import native_sixteen_bit_matmul
from orca_compile.host_probes import read_bandwidth
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
    p.add_argument("--stream", action="store_true", help="all of Qwen2.5-0.5B's linear weights, from DRAM")
    args = p.parse_args()
    torch.manual_seed(0)
    if args.stream:
        return stream(args.rows, args.reps)
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


# (in, out) of each linear of a Qwen2.5-0.5B layer: Q, K, V, O, gate, up, down
QWEN_LAYER = [(896, 896), (896, 128), (896, 128), (896, 896), (896, 4864), (896, 4864), (4864, 896)]
QWEN_LAYERS, QWEN_VOCAB = 24, 151936


def stream(rows, reps: int) -> None:
    shapes = QWEN_LAYER * QWEN_LAYERS + [(896, QWEN_VOCAB)]
    weights = [torch.randn(n, k, dtype=torch.bfloat16) for k, n in shapes]
    nbytes = sum(w.numel() * 2 for w in weights)
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w, 32) for w in weights]
    c16 = [gemm_cpu.pack(w.float(), torch.bfloat16) for w in weights]
    bandwidth = read_bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, AMX: {native_sixteen_bit_matmul(torch.bfloat16)}; "
          f"{len(shapes)} linears, {nbytes / 1e6:.0f} MB in bfloat16; DRAM read {bandwidth / 1e9:.1f} GB/s: "
          f"{nbytes / bandwidth * 1e3:.1f} ms to stream them")
    for m in rows:
        xs = {k: torch.randn(m, k) for k in {k for k, _ in shapes}}
        xs16 = {k: x.bfloat16() for k, x in xs.items()}

        def run_onednn():
            for (k, n), w in zip(shapes, onednn):
                torch.ops.mkldnn._linear_pointwise(xs16[k], w, None, "none", [], "")

        def run_c16():
            for (k, n), w in zip(shapes, c16):
                gemm_cpu.linear(xs[k], w, None, n)

        for name, fn in (("oneDNN bfloat16 (packed)", run_onednn), ("C GEMM, bfloat16 weights", run_c16)):
            s = timed(fn, reps)
            print(f"  {m:4d} rows  {name:26} {s * 1e3:8.1f} ms  = {s * bandwidth / nbytes:.2f}x the stream")


if __name__ == "__main__":
    main()
