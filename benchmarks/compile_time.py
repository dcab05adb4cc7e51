"""Compile time of orca-compile (capture + passes) next to torch.export's own time, same model.

    python benchmarks/compile_time.py [--model gpt2-small-random] [--repeats 3]

torch.export is timed inside ``capture`` (the same export call, nothing else); "passes" is the sum
of flatten_tokens, split_attention, prune_logits and cleanup. The first compile of a process pays
one-off import and cache costs, so one warm-up compile of a tiny model runs first; the figures
are medians over ``--repeats`` fresh compiles.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import orca_compile
from orca_compile.presets import load_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt2-small-random")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    orca_compile.compile(load_model("tiny-gpt2"), keep_stages=False)  # warm-up
    model = load_model(args.model)
    runs = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        cm = orca_compile.compile(model, keep_stages=False)
        total = time.perf_counter() - start
        export = cm.graph_module.meta["orca"].export_seconds
        runs.append(dict(total=total, export=export, passes=cm.pass_seconds,
                         **{r.name: r.seconds for r in cm.records}))
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    # flatten_tokens with ORCA_VERIFY_PASSES semantics: every op re-run on fake tensors, sympy check
    from orca_compile.capture import capture
    from orca_compile.passes.flatten_tokens import flatten_tokens

    verify = []
    for _ in range(args.repeats):
        gm = capture(model)
        start = time.perf_counter()
        flatten_tokens(gm, verify=True)
        verify.append(time.perf_counter() - start)
    print(f"model {args.model}: {cm.num_layers} layers, {len(cm.graph_module.graph.nodes)} nodes in the final graph")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"median of {args.repeats}:")
    print("| torch.export | passes | passes / export | flatten_tokens | split_attention | prune_logits | cleanup | compile() total |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {med['export']:.2f} s | {med['passes']:.2f} s | {med['passes'] / med['export']:.0%} | "
          f"{med['flatten_tokens']:.3f} s | {med['split_attention']:.3f} s | {med['prune_logits']:.3f} s | "
          f"{med['cleanup']:.3f} s | {med['total']:.2f} s |")
    print(f"flatten_tokens in verify mode: {statistics.median(verify):.3f} s (fast mode above: {med['flatten_tokens']:.3f} s)")


if __name__ == "__main__":
    main()
