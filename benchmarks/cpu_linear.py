"""The linear layers of GPT-2 small (12 layers x 4 weights, then the LM head), as the engine runs
them: ``torch.addmm`` / ``mm`` (the eager graph; MKL packs the weight on every call), oneDNN on
weights packed once (the ``onednn`` backend) and this project's C GEMM on weights packed once (the
``cpu`` backend; ``kernels/cpu_gemm.c``), at the row counts of W1's iterations. Every weight is
its own tensor, 497 MB in all, so they stream from DRAM as in serving. docs/benchmarks.md quotes
its output.

    python benchmarks/cpu_linear.py
"""
from __future__ import annotations

import time

import torch

from orca_compile.kernels import gemm_cpu

SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]  # (in, out): qkv, attn out, fc, proj


def main():
    torch.manual_seed(0)
    layers = [[(torch.randn(k, n) * 0.02, torch.randn(n) * 0.02) for k, n in SHAPES] for _ in range(12)]
    wte = torch.randn(50257, 768) * 0.02
    pack = torch.ops.mkldnn._reorder_linear_weight
    linear = torch.ops.mkldnn._linear_pointwise
    packed = [[(pack(w.t().contiguous(), 32), b) for w, b in layer] for layer in layers]
    packed_wte = pack(wte, 32)
    c_layers = [[(gemm_cpu.pack(w.t().contiguous()), b, w.shape[1]) for w, b in layer] for layer in layers]
    c_wte = gemm_cpu.pack(wte)

    def eager(x, x4):
        for layer in layers:
            for (w, b) in layer:
                torch.addmm(b, x if w.shape[0] == 768 else x4, w)
        torch.mm(x, wte.t())

    def onednn(x, x4):
        for layer in packed:
            for j, (w, b) in enumerate(layer):
                linear(x if SHAPES[j][0] == 768 else x4, w, b, "none", [], "")
        linear(x, packed_wte, None, "none", [], "")

    def c_gemm(x, x4):
        for layer in c_layers:
            for j, (w, b, n) in enumerate(layer):
                gemm_cpu.linear(x if SHAPES[j][0] == 768 else x4, w, b, n)
        gemm_cpu.linear(x, c_wte, None, wte.shape[0])

    def timed(fn, *args, reps=5):
        fn(*args)
        start = time.perf_counter()
        for _ in range(reps):
            fn(*args)
        return (time.perf_counter() - start) / reps * 1e3

    systems = {"addmm/mm": eager, "oneDNN packed": onednn}
    if gemm_cpu.available():
        systems["C GEMM packed"] = c_gemm
    else:
        print(f"(C GEMM unavailable: {gemm_cpu.why_unavailable()})")
    flops = 2 * sum(k * n for k, n in SHAPES) * 12 + 2 * 768 * 50257
    print(f"torch threads {torch.get_num_threads()}; 48 layer GEMMs + LM head (50257 x 768), float32; "
          "best of 3 interleaved runs")
    for rows in (1, 8, 16, 32, 64, 512):
        x, x4 = torch.randn(rows, 768), torch.randn(rows, 3072)
        runs = {name: [] for name in systems}
        for _ in range(3):  # interleaved: this machine's speed drifts
            for name, fn in systems.items():
                runs[name].append(timed(fn, x, x4))
        best = {name: min(r) for name, r in runs.items()}
        cells = [f"{name} {ms:7.1f} ms ({rows * flops / ms / 1e6:5.1f} GFLOP/s)" for name, ms in best.items()]
        print(f"  {rows:4d} rows: " + ", ".join(cells))


if __name__ == "__main__":
    main()
