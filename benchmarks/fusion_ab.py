"""A/B: the engine with one of the CPU lowering's fusions switched off (A) or on (B).

    python benchmarks/fusion_ab.py ln|rope|rms16|products [ROUNDS]

``ln``: layer norm with its residual add (``passes/fuse_norms.py``) on W1's own model (GPT-2
small, random weights, float32); ``rope``: the rotary embedding (``passes/fuse_rope.py``) on GPT-2
small's size in Llama's form (12 layers, hidden 768, 12 heads, SiLU MLP of 2048, vocab 32000,
random weights, float32). On W2 (the bfloat16 Qwen2.5-0.5B-shaped checkpoint, its linears
multiplying in bfloat16 on this AMX machine; ``orca-compile bench w2``'s engine): ``rms16``, HF's
RMSNorm with its residual add and the 16-bit casts around it (``passes/fuse_norms.py``);
``products``, the gated MLP's product in 16 bits (``passes/lower_sixteen_bit.py``); W2's passes
vary too much on this machine for these (see ``decode_ab.py``, which times its decode step). (``rms``, the
RMSNorm fusion on the float32 path, was measured with this script at commit
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
from orca_compile.passes import fuse_norms, fuse_rope, lower_sixteen_bit
from orca_compile.presets import load_model

# the function switched off for engine A, and what it then returns (matches nothing / rewrites nothing)
MATCHERS = {"ln": (fuse_norms, "_layer_norm", None), "rope": (fuse_rope, "_match", None),
            "rms16": (fuse_norms, "_rms_norm", None), "products": (lower_sixteen_bit, "multiply_in_sixteen_bits", 0)}
W2_FUSIONS = ("rms16", "products")


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
    sizes = {}
    if fusion in W2_FUSIONS:
        w2 = bench.WORKLOADS["w2"]
        model = w2.source()  # loaded by path with default options, as bench w2 does
        reqs = w2.requests(load_model(w2.model, dtype="bfloat16").config.vocab_size)
        sizes = {"max_num_seqs": w2.max_num_seqs, "max_num_batched_tokens": w2.max_num_batched_tokens}
    elif fusion == "ln":
        model = load_model(bench.WORKLOADS["w1"].model, dtype="float32")
    else:
        config = LlamaConfig(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, num_key_value_heads=12,
                             intermediate_size=2048, vocab_size=32000, max_position_embeddings=1024)
        model = LlamaForCausalLM(config).eval()
    if fusion not in W2_FUSIONS:
        reqs = bench.WORKLOADS["w1"].requests(model.config.vocab_size)
    module, name, nothing = MATCHERS[fusion]
    matcher = getattr(module, name)
    setattr(module, name, lambda *args: nothing)  # that fusion is off for this engine
    try:
        off = bench.prepare_engine(model, reqs, **sizes)
    finally:
        setattr(module, name, matcher)
    on = bench.prepare_engine(model, reqs, **sizes)
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
