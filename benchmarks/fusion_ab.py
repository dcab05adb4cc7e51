"""A/B: the engine on W1's requests over a Llama-shaped model, with one of the CPU lowering's
Llama-side fusions switched off (A) or on (B).

    python benchmarks/fusion_ab.py rms|rope [ROUNDS]

``rms``: RMSNorm with its residual add (``passes/fuse_norms.py``); ``rope``: the rotary embedding
(``passes/fuse_rope.py``). The model: GPT-2 small's size in Llama's form (12 layers, hidden 768,
12 heads, SiLU MLP of 2048, vocab 32000, random weights, float32). Both engines are set up first
(each compiles, lowers and runs the workload once untimed); then the timed passes alternate ABBA,
so a drift of the machine lands on both. Prints each pass and the medians; docs/benchmarks.md has
the figures.
"""
from __future__ import annotations

import statistics
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from orca_compile import bench
from orca_compile.passes import fuse_norms, fuse_rope

MATCHERS = {"rms": (fuse_norms, "_rms_norm"), "rope": (fuse_rope, "_match")}


def main(fusion: str, rounds: int = 3) -> None:
    if fusion not in MATCHERS:
        raise SystemExit(f"fusion must be one of {', '.join(MATCHERS)}, got {fusion!r}")
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, num_key_value_heads=12,
                         intermediate_size=2048, vocab_size=32000, max_position_embeddings=1024)
    model = LlamaForCausalLM(config).eval()
    reqs = bench.WORKLOADS["w1"].requests(config.vocab_size)
    module, name = MATCHERS[fusion]
    matcher = getattr(module, name)
    setattr(module, name, lambda *args: None)  # matches nothing: that fusion is off for this engine
    try:
        off = bench.prepare_engine(model, reqs)
    finally:
        setattr(module, name, matcher)
    on = bench.prepare_engine(model, reqs)
    labels = (f"{fusion} off", f"{fusion} fused")
    times = {k: [] for k in labels}
    tokens = {}
    for r in range(rounds):
        order = list(zip(labels, (off, on)))
        for label, timed in (order if r % 2 == 0 else order[::-1]):
            res, tokens[label] = timed()
            times[label].append(res.seconds)
            print(f"round {r + 1}: {label:12s} {res.seconds:6.3f} s  "
                  f"full-batch decode iteration {res.extra.get('full_batch_iteration_ms', float('nan')):.1f} ms")
    a, b = (statistics.median(times[k]) for k in labels)
    print(f"medians: off {a:.3f} s, fused {b:.3f} s: {b / a:.3f}x the time; "
          f"same tokens for {bench.agreement(tokens[labels[0]], tokens[labels[1]]):.0%} of requests")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "rope", int(sys.argv[2]) if len(sys.argv) > 2 else 3)
