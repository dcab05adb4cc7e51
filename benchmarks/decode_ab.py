"""A/B of one W2 decode step: the graph's forward at 8 rows with one of the 16-bit path's rewrites
switched off (A) or on (B), timed pair by pair on the same inputs.

    python benchmarks/decode_ab.py rms16|products|all [PAIRS]
    python benchmarks/decode_ab.py gemms [PAIRS]

Where ``fusion_ab.py`` times whole passes over W2 (~10 s each, on a machine whose passes vary by
2x from one minute to the next), this times the forward that a decode iteration runs (~60-110 ms)
many times, A and B back to back in alternating order, so a slow spell of the machine lands on
both halves of a pair. Both engines are built in one process from W2's checkpoint with default
options (the 16-bit multiplies on an AMX CPU; under ONEDNN_MAX_CPU_ISA below AMX, float32
arithmetic on the C GEMM); W2's first eight requests run in B to their first
decode step, whose inputs (8 rows; prompts of 57-248 tokens and their first outputs in the KV
caches) are captured and copied for A;
then the two forwards alternate. The verdict is the
project's rule: an exact one-sided Wilcoxon signed-rank test on the per-pair log ratios (B / A)
(a normal approximation for more than 20 pairs), p < 0.05 to keep. ``all``: every rewrite off
against every rewrite on. ``gemms``: the committed step against the same graph with each GEMM's
result looked up instead of computed (its output from one real call, cached; a copy returned
each time, as a fused norm may write over it): what the step costs
besides its GEMMs (the other calls, their Python, the C kernels), pair by pair.
"""
from __future__ import annotations

import math
import statistics
import sys
import time

import torch

from fusion_ab import MATCHERS, W2_FUSIONS, wilcoxon_p  # the script beside this one


def _engine(off: tuple[str, ...]):
    import orca_compile
    from orca_compile import SamplingParams
    from orca_compile.bench import WORKLOADS
    from orca_compile.presets import load_model

    saved = {}
    for name in off:
        module, attr, nothing = MATCHERS[name]
        saved[name] = getattr(module, attr)
        setattr(module, attr, lambda *args, _nothing=nothing: _nothing)
    try:
        w2 = WORKLOADS["w2"]
        engine = orca_compile.optimize(w2.source(), max_num_seqs=w2.max_num_seqs)
    finally:
        for name, fn in saved.items():
            module, attr, _ = MATCHERS[name]
            setattr(module, attr, fn)
    gm = engine.executor.runner.model.graph_module
    captured = []
    forward = gm.forward

    def spy(*args):
        if args[0].shape[0] == w2.max_num_seqs and not captured:  # the first all-decode step
            captured.append([a.clone() if isinstance(a, torch.Tensor) else a for a in args])
        return forward(*args)

    gm.forward = spy
    reqs = w2.requests(load_model(w2.model, dtype="bfloat16").config.vocab_size)[:w2.max_num_seqs]
    engine.generate([p for p, _ in reqs], [SamplingParams(max_tokens=4, ignore_eos=True)] * len(reqs))
    del gm.forward
    return engine, gm, captured[0]


def wilcoxon_p_normal(ratios: list[float]) -> float:
    """One-sided p that the ratios are below 1, by the signed-rank statistic's normal approximation."""
    logs = [math.log(r) for r in ratios]
    n = len(logs)
    ranks = {i: k + 1 for k, i in enumerate(sorted(range(n), key=lambda i: abs(logs[i])))}
    w_plus = sum(ranks[i] for i, x in enumerate(logs) if x > 0)
    mean, sd = n * (n + 1) / 4, math.sqrt(n * (n + 1) * (2 * n + 1) / 24)
    return 0.5 * (1 + math.erf((w_plus - mean) / sd / math.sqrt(2)))


def _gemm_targets():
    """The graph targets that are GEMMs: oneDNN's linear (the 16-bit multiplies) and the C GEMM (float32
    arithmetic, on float32 or 16-bit weights: a CPU without AMX, or oneDNN capped below it)."""
    from orca_compile.kernels import gemm_cpu

    return (torch.ops.mkldnn._linear_pointwise.default, gemm_cpu.linear)


def _without_gemms(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm``'s graph with each GEMM replaced by a lookup of the result its first call made."""
    import copy

    out = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    for linear in _gemm_targets():
        results = {}

        def looked_up(x, w, *rest, _linear=linear, _results=results):
            key = (id(w), x.shape[0])
            if key not in _results:
                _results[key] = _linear(x, w, *rest)
            # a copy: a fused norm may write over a GEMM's result that dies at its add
            return _results[key].clone()

        for node in out.graph.find_nodes(op="call_function", target=linear):
            node.target = looked_up
    out.recompile()
    return out


def gemms(pairs: int) -> None:
    _, gm, args = _engine(())
    bare = _without_gemms(gm)
    with torch.no_grad():
        for _ in range(3):
            gm(*args), bare(*args)
        times = {"step": [], "without GEMMs": []}
        for i in range(pairs):
            order = [("step", gm), ("without GEMMs", bare)]
            for label, g in (order if i % 2 == 0 else order[::-1]):
                start = time.perf_counter()
                g(*args)
                times[label].append(time.perf_counter() - start)
    calls = sum(n.op == "call_function" for n in gm.graph.nodes)
    linears = sum(len(gm.graph.find_nodes(op="call_function", target=t)) for t in _gemm_targets())
    rest = times["without GEMMs"]
    print(f"decode step at 8 rows, {pairs} pairs: {calls} graph calls, {linears} of them GEMMs")
    print(f"the step: median {statistics.median(times['step']) * 1e3:.1f} ms (min {min(times['step']) * 1e3:.1f}); "
          f"without the GEMMs' work: median {statistics.median(rest) * 1e3:.1f} ms (min {min(rest) * 1e3:.1f}), "
          f"{statistics.median(rest) / (calls - linears) * 1e6:.1f} us for each of the other calls")


def main(fusion: str, pairs: int = 40) -> None:
    if fusion == "gemms":
        return gemms(pairs)
    if fusion not in (*W2_FUSIONS, "all"):
        raise SystemExit(f"fusion must be one of {', '.join(W2_FUSIONS)}, all, gemms; got {fusion!r}")
    off = W2_FUSIONS if fusion == "all" else (fusion,)
    _, gm_a, _ = _engine(off)
    _, gm_b, args_b = _engine(())
    # one captured step for both: A gets its own copy of B's inputs (the KV caches included), so
    # the logits compare on the same tokens, positions and cache contents
    args_a = [a.clone() if isinstance(a, torch.Tensor) else a for a in args_b]
    calls = {k: sum(n.op == "call_function" for n in g.graph.nodes) for k, g in (("off", gm_a), ("on", gm_b))}
    with torch.no_grad():
        same = all(torch.equal(x, y) for x, y in zip(gm_a(*args_a), gm_b(*args_b)))
        for _ in range(3):
            gm_a(*args_a), gm_b(*args_b)
        times = {"off": [], "on": []}
        for i in range(pairs):
            order = [("off", gm_a, args_a), ("on", gm_b, args_b)]
            for label, gm, args in (order if i % 2 == 0 else order[::-1]):
                start = time.perf_counter()
                gm(*args)
                times[label].append(time.perf_counter() - start)
    ratios = [b / a for a, b in zip(times["off"], times["on"])]
    p = wilcoxon_p(ratios) if len(ratios) <= 20 else wilcoxon_p_normal(ratios)
    q = sorted(ratios)
    print(f"{fusion}: graph calls off {calls['off']}, on {calls['on']}; the same logits: {same}")
    print(f"forward at 8 rows, {pairs} pairs: off median {statistics.median(times['off']) * 1e3:.1f} ms "
          f"(min {min(times['off']) * 1e3:.1f}), on median {statistics.median(times['on']) * 1e3:.1f} ms "
          f"(min {min(times['on']) * 1e3:.1f})")
    print(f"per-pair on/off: median {statistics.median(ratios):.3f}, quartiles {q[len(q) // 4]:.3f}-"
          f"{q[3 * len(q) // 4]:.3f}; Wilcoxon one-sided p = {p:.2g}: "
          + ("a gain beyond the spread (keep)" if p < 0.05 else "inside the spread (remove)"))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "all", int(sys.argv[2]) if len(sys.argv) > 2 else 40)
