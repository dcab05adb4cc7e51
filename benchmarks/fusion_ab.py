"""A/B: the engine on W1's requests with one of the CPU lowering's fusions switched off (A) or on (B).

    python benchmarks/fusion_ab.py ln|rope [ROUNDS]

``ln``: layer norm with its residual add (``passes/fuse_norms.py``) on W1's own model (GPT-2
small, random weights, float32); ``rope``: the rotary embedding (``passes/fuse_rope.py``) on GPT-2
small's size in Llama's form (12 layers, hidden 768, 12 heads, SiLU MLP of 2048, vocab 32000,
random weights, float32). (``rms``, the RMSNorm fusion, was measured with this script at commit
c25dcf7 plus this session's A/B rule, and removed.) Both engines are set up first
(each compiles, lowers and runs the workload once untimed); then the timed passes alternate ABBA,
so a drift of the machine lands on both. Prints each pass, the per-round ratios, the medians, and
the verdict by the project's rule (docs/benchmarks.md): a fusion pays its way when its gain is
beyond the run-to-run spread, that is when an exact one-sided Wilcoxon signed-rank test on the
per-round log ratios (fused / off) gives p < 0.05 (with 7 rounds: at most one round, and that a
small one, going the other way).
"""
from __future__ import annotations

import itertools
import math
import statistics
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from orca_compile import bench
from orca_compile.passes import fuse_norms, fuse_rope
from orca_compile.presets import load_model

MATCHERS = {"ln": (fuse_norms, "_layer_norm"), "rope": (fuse_rope, "_match")}


def wilcoxon_p(ratios: list[float]) -> float:
    """Exact one-sided p of the Wilcoxon signed-rank test that the ratios are below 1: the share of
    the 2^n sign assignments of the ranked |log ratio|s whose positive-rank sum is at most the
    observed one (no ties expected in timings)."""
    logs = [math.log(r) for r in ratios]
    ranks = {i: k + 1 for k, i in enumerate(sorted(range(len(logs)), key=lambda i: abs(logs[i])))}
    observed = sum(ranks[i] for i, x in enumerate(logs) if x > 0)
    sums = [sum(r for r, s in zip(ranks.values(), signs) if s) for signs in itertools.product((0, 1), repeat=len(logs))]
    return sum(s <= observed for s in sums) / len(sums)


def main(fusion: str, rounds: int = 3) -> None:
    if fusion not in MATCHERS:
        raise SystemExit(f"fusion must be one of {', '.join(MATCHERS)}, got {fusion!r}")
    torch.manual_seed(0)
    if fusion == "ln":
        model = load_model(bench.WORKLOADS["w1"].model, dtype="float32")
    else:
        config = LlamaConfig(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, num_key_value_heads=12,
                             intermediate_size=2048, vocab_size=32000, max_position_embeddings=1024)
        model = LlamaForCausalLM(config).eval()
    reqs = bench.WORKLOADS["w1"].requests(model.config.vocab_size)
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
    ratios = [y / x for x, y in zip(times[labels[0]], times[labels[1]])]
    p = wilcoxon_p(ratios)
    print(f"per-round fused/off: {', '.join(f'{r:.3f}' for r in ratios)}; median {statistics.median(ratios):.3f}, "
          f"range {min(ratios):.3f}-{max(ratios):.3f}; Wilcoxon one-sided p = {p:.3f}: "
          + ("a gain beyond the spread (keep)" if p < 0.05 else "inside the spread (remove)"))
    print(f"medians: off {a:.3f} s, fused {b:.3f} s: {b / a:.3f}x the time; "
          f"same tokens for {bench.agreement(tokens[labels[0]], tokens[labels[1]]):.0%} of requests")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "rope", int(sys.argv[2]) if len(sys.argv) > 2 else 3)
