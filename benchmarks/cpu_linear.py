"""The linear layers of GPT-2 small (12 layers x 4 weights, then the LM head), as the engine runs
them: ``torch.addmm`` / ``mm`` (the eager graph; MKL packs the weight on every call) against
oneDNN on weights packed once (``passes/lower_cpu.py``), at the row counts of W1's iterations.
Every weight is its own tensor, 497 MB in all, so they stream from DRAM as in serving.
docs/benchmarks.md quotes its output.

    python benchmarks/cpu_linear.py
"""
from __future__ import annotations

import time

import torch

SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]  # (in, out): qkv, attn out, fc, proj


def main():
    torch.manual_seed(0)
    layers = [[(torch.randn(k, n) * 0.02, torch.randn(n) * 0.02) for k, n in SHAPES] for _ in range(12)]
    wte = torch.randn(50257, 768) * 0.02
    pack = torch.ops.mkldnn._reorder_linear_weight
    linear = torch.ops.mkldnn._linear_pointwise
    packed = [[(pack(w.t().contiguous(), 32), b) for w, b in layer] for layer in layers]
    packed_wte = pack(wte, 32)

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

    def timed(fn, *args, reps=5):
        fn(*args)
        start = time.perf_counter()
        for _ in range(reps):
            fn(*args)
        return (time.perf_counter() - start) / reps * 1e3

    print(f"torch threads {torch.get_num_threads()}; 48 layer GEMMs + LM head (50257 x 768), float32")
    for rows in (1, 8, 32, 512):
        x, x4 = torch.randn(rows, 768), torch.randn(rows, 3072)
        runs = {"addmm": [], "onednn": []}
        for _ in range(3):  # interleaved: this machine's speed drifts
            runs["addmm"].append(timed(eager, x, x4))
            runs["onednn"].append(timed(onednn, x, x4))
        a, b = min(runs["addmm"]), min(runs["onednn"])
        print(f"  {rows:4d} rows: addmm/mm {a:8.1f} ms, oneDNN packed {b:8.1f} ms ({a / b:.2f}x; best of 3)")


if __name__ == "__main__":
    main()
