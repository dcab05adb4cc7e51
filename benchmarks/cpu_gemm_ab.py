"""Interleaved A/B of two versions of the C GEMM (kernels/cpu_gemm.c) on GPT-2 small's 49 GEMMs,
weights streaming from DRAM as in serving.

This machine's speed drifts by 5-15% over minutes, more than most kernel changes move it, so two
versions timed in separate runs cannot be compared. Here both builds are loaded into one process
and timed alternately (ABBA order), 7 times each per row count; the medians and their ratio are
printed. An A/A run (the same file twice) shows the noise floor: within ~2% at 8 rows and more,
~5% at 1 row (DRAM-bound).

    python benchmarks/cpu_gemm_ab.py OLD.c NEW.c [ROWS ...]       # e.g. git show HEAD~1:kernels/cpu_gemm.c > /tmp/old.c
    python benchmarks/cpu_gemm_ab.py OLD.c NEW.c --weights bfloat16 [ROWS ...]   # 16-bit weights, float32 arithmetic
    python benchmarks/cpu_gemm_ab.py OLD.c NEW.c --check           # first: the same outputs, bit for bit?

``--check`` compares the two builds' outputs on every weight dtype over shapes (partial panels,
odd panel counts, panels larger than a group), row counts 0-64 and two prefill sizes,
activations and thread counts, and says how many differ; a change meant to keep the results
(a faster kernel, a new blocking) must show 0.
"""
from __future__ import annotations

import argparse
import ctypes
import pathlib
import subprocess
import tempfile
import time

import torch

from orca_compile.kernels import cbuild, gemm_cpu

SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]  # (in, out): qkv, attn out, fc, proj
VOCAB = 50257


def build(source: str, out_dir: pathlib.Path, name: str) -> ctypes.CDLL:
    target = out_dir / f"{name}.so"
    subprocess.run([cbuild.compiler(), *cbuild.FLAGS, *cbuild.tuning_flags(), *cbuild.VARIANTS[0], f"-I{pathlib.Path(cbuild.__file__).parent}",
                    source, "-o", str(target), "-lm"], check=True)
    lib = ctypes.CDLL(str(target))
    gemm_cpu._declare(lib)
    return lib


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("rows", nargs="*", type=int, default=[1, 8, 16, 32, 64])
    p.add_argument("--weights", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="the packed weights' dtype (16 bits: float32 arithmetic on them)")
    p.add_argument("--check", action="store_true", help="compare the builds' outputs bit for bit first")
    args = p.parse_args()
    storage = getattr(torch, args.weights)
    code = gemm_cpu.CODES[(torch.float32, storage)]
    with tempfile.TemporaryDirectory() as tmp:
        libs = [build(args.a, pathlib.Path(tmp), "a"), build(args.b, pathlib.Path(tmp), "b")]
        if args.check:
            check(libs)
        torch.manual_seed(0)
        layers = [[(gemm_cpu.pack(torch.randn(n, k) * 0.02, storage), torch.randn(n) * 0.02, n) for k, n in SHAPES]
                  for _ in range(12)]
        head = gemm_cpu.pack(torch.randn(VOCAB, 768) * 0.02, storage)
        threads = torch.get_num_threads()

        def run(lib, x, x4, outs):
            for layer in layers:
                for j, (w, b, n) in enumerate(layer):
                    a = x if SHAPES[j][0] == 768 else x4
                    lib.orca_gemm(code, a.data_ptr(), a.stride(0), w.data_ptr(), b.data_ptr(), outs[j].data_ptr(), n,
                                  a.shape[0], n, a.shape[1], 0, threads)
            lib.orca_gemm(code, x.data_ptr(), 768, head.data_ptr(), None, outs[-1].data_ptr(), VOCAB, x.shape[0], VOCAB,
                          768, 0, threads)

        print(f"torch threads {threads}; {args.weights} weights; A = {args.a}, B = {args.b}; median of 7 interleaved runs")
        for rows in args.rows:
            x, x4 = torch.randn(rows, 768), torch.randn(rows, 3072)
            outs = [torch.empty(rows, n) for _, n in SHAPES] + [torch.empty(rows, VOCAB)]
            times = [[], []]
            for rep in range(7):
                for i in ((0, 1) if rep % 2 == 0 else (1, 0)):
                    start = time.perf_counter()
                    run(libs[i], x, x4, outs)
                    times[i].append(time.perf_counter() - start)
            a, b = (sorted(t)[len(t) // 2] * 1e3 for t in times)
            print(f"  {rows:4d} rows: A {a:7.2f} ms, B {b:7.2f} ms, B/A {b / a:.3f}")


def check(libs) -> None:
    torch.manual_seed(0)
    cases = differ = 0
    for storage in (torch.float32, torch.bfloat16, torch.float16):
        if not all(lib.orca_gemm_supports(gemm_cpu.CODES[(torch.float32, storage)]) for lib in libs):
            continue
        code = gemm_cpu.CODES[(torch.float32, storage)]
        for n, k in [(16, 8), (37, 19), (5, 3), (100, 67), (4864, 96), (896, 4864)]:
            w = gemm_cpu.pack(torch.randn(n, k), storage)
            b = torch.randn(n)
            for m in [*range(65), 97, 131]:
                x = torch.randn(m, k)
                for act in (0, 2, 3):
                    for threads in (1, 2, 3):
                        outs = [torch.empty(m, n) for _ in libs]
                        for lib, out in zip(libs, outs):
                            lib.orca_gemm(code, x.data_ptr(), k, w.data_ptr(), b.data_ptr() if act != 3 else None,
                                          out.data_ptr(), n, m, n, k, act, threads)
                        cases += 1
                        differ += not torch.equal(outs[0], outs[1])
    print(f"--check: {cases} cases (weight dtype x shape x rows x activation x threads), {differ} differ")


if __name__ == "__main__":
    main()
