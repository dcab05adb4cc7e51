"""A/B: the engine on W1's requests over a Llama-shaped model, RMSNorm fused (``passes/fuse_norms``)
or left as ATen ops.

    python benchmarks/rms_norm_ab.py [ROUNDS]

The model: GPT-2 small's size in Llama's form (12 layers, hidden 768, 12 heads, SiLU MLP of 2048,
vocab 32000, random weights, float32). Both engines are set up first (each compiles, lowers and
runs the workload once untimed); then the timed passes alternate ABBA, so a drift of the machine
lands on both. Prints each pass and the medians; docs/benchmarks.md has the figures.
"""
from __future__ import annotations

import statistics
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from orca_compile import bench
from orca_compile.passes import fuse_norms


def main(rounds: int = 3) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, num_key_value_heads=12,
                         intermediate_size=2048, vocab_size=32000, max_position_embeddings=1024)
    model = LlamaForCausalLM(config).eval()
    reqs = bench.WORKLOADS["w1"].requests(config.vocab_size)
    matcher = fuse_norms._rms_norm
    fuse_norms._rms_norm = lambda gm, node: None  # RMSNorm left to ATen; layer norms would still fuse
    try:
        unfused = bench.prepare_engine(model, reqs)
    finally:
        fuse_norms._rms_norm = matcher
    fused = bench.prepare_engine(model, reqs)
    times = {"ATen RMSNorm": [], "fused RMSNorm": []}
    tokens = {}
    for r in range(rounds):
        order = [("ATen RMSNorm", unfused), ("fused RMSNorm", fused)]
        for name, timed in (order if r % 2 == 0 else order[::-1]):
            res, tokens[name] = timed()
            times[name].append(res.seconds)
            print(f"round {r + 1}: {name:14s} {res.seconds:6.3f} s  "
                  f"full-batch decode iteration {res.extra.get('full_batch_iteration_ms', float('nan')):.1f} ms")
    a, b = (statistics.median(times[k]) for k in times)
    print(f"medians: ATen {a:.3f} s, fused {b:.3f} s: {b / a:.3f}x the time; "
          f"same tokens for {bench.agreement(tokens['ATen RMSNorm'], tokens['fused RMSNorm']):.0%} of requests")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
