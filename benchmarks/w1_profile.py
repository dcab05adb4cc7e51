"""Where W1's time goes in the engine: each kernel call of the lowered graph timed from Python,
summed over the iterations that carry prefill tokens and over the decode-only ones.

The engine is set up as `orca-compile bench w1` sets it up (compile, lower, one untimed pass over
the workload); then the graph's kernel functions are wrapped with timers and the workload runs
once more. The wrappers cost ~1 us a call (~90 calls an iteration), so totals read ~0.1 ms an
iteration high. "graph, other" is the forward's time outside the kernel calls (the graph's own
Python and its view ops); "engine, other" is the iteration's time outside the forward
(scheduling, batch building, sampling).

    python benchmarks/w1_profile.py
"""
from __future__ import annotations

import collections
import time

import orca_compile
from orca_compile import SamplingParams
from orca_compile.bench import WORKLOADS
from orca_compile.presets import load_model

KINDS = {"gemm_cpu_linear": "GEMM (C linear)", "attention_cpu_attention": "attention (C)",
         "norm_cpu_add_layer_norm": "add + layer norm (C)"}


def main():
    w = WORKLOADS["w1"]
    model = load_model(w.model, dtype=w.dtype)
    reqs = w.requests(model.config.vocab_size)
    compiled = orca_compile.compile(model, keep_stages=False)
    blocks = sum(-(-(len(p) + n) // 16) for p, n in reqs) + 1
    engine = orca_compile.optimize(compiled, max_num_seqs=32, max_num_batched_tokens=512, block_size=16,
                                   num_kv_blocks=blocks)
    prompts, params = [p for p, _ in reqs], [SamplingParams(max_tokens=n, ignore_eos=True) for _, n in reqs]
    engine.generate(prompts, params)  # set-up pass, untimed

    lowered = engine.executor.runner.model  # the artifact the engine runs (lowered for its backend)
    graph_globals = lowered.graph_module.forward.__globals__
    spent = collections.defaultdict(float)
    phase = ["decode"]

    def timed(name, fn):
        kind = next(k for suffix, k in KINDS.items() if name.endswith(suffix))

        def call(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            spent[phase[0], kind] += time.perf_counter() - start
            return out
        return call

    for name in [n for n in graph_globals if any(n.endswith(s) for s in KINDS)]:
        graph_globals[name] = timed(name, graph_globals[name])
    forward = lowered.forward
    names = lowered.input_names
    ids, qsl = names.index("input_ids"), names.index("query_start_loc")

    def forward_timed(*args):
        # more tokens than requests: some request feeds a prompt chunk (the iteration's kind is
        # judged the same way below)
        phase[0] = "prefill" if args[ids].shape[0] > args[qsl].shape[0] - 1 else "decode"
        start = time.perf_counter()
        out = forward(*args)
        spent[phase[0], "forward"] += time.perf_counter() - start
        return out
    lowered.forward = forward_timed

    engine.iteration_stats.clear()
    start = time.perf_counter()
    engine.generate(prompts, params)
    total = time.perf_counter() - start
    its = list(engine.iteration_stats)
    for name in ("prefill", "decode"):
        chosen = [it for it in its if (it.num_prefill_tokens + it.num_decode_tokens > len(it.request_ids))
                  == (name == "prefill")]
        wall = sum(it.seconds for it in chosen)
        kernels = {k: spent[name, k] for k in KINDS.values()}
        print(f"{name} iterations: {len(chosen)}, {wall:.3f} s")
        for kind, seconds in kernels.items():
            print(f"  {kind:24} {seconds:7.3f} s")
        print(f"  {'graph, other':24} {spent[name, 'forward'] - sum(kernels.values()):7.3f} s")
        print(f"  {'engine, other':24} {wall - spent[name, 'forward']:7.3f} s")
    print(f"total {total:.3f} s")


if __name__ == "__main__":
    main()
