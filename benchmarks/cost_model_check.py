"""The cost model's predicted iteration time against the measured one, on W1's model (GPT-2 small,
float32), for a prefill-heavy and a decode-heavy iteration, one process (tp=1, two threads) and
two tensor-parallel ranks (tp=2, a process and a thread each).

    python benchmarks/cost_model_check.py [--json out.json]

The machine is measured first, as each plan runs it (``host_probes.measure_machine``: matmul
rate, DRAM read rate and an op's launch cost with ``2 / tp`` threads; the all-reduce link between
two gloo processes). Predicted: ``graph_cost(rank 0's lowered graph).predict_seconds(...)``.
Measured: the engine's ``forward_seconds`` of that iteration (rank 0's, all-reduce waits
included), the median of several. docs/benchmarks.md has the figures.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

import orca_compile
from orca_compile import SamplingParams
from orca_compile.host_probes import measure_machine
from orca_compile.passes.partition.cost_model import graph_cost
from orca_compile.presets import load_model

MODEL, DTYPE = "gpt2-small-random", "float32"
PREFILL = dict(requests=4, prompt=128)  # one iteration of 4 x 128 new tokens (the 512-token budget)
DECODE = dict(requests=32, prompt=96)  # 32 decodes over contexts of ~100 tokens


def measure(tp: int) -> dict:
    options = dict(dtype=DTYPE, tensor_parallel_size=tp, max_num_seqs=32, max_num_batched_tokens=512,
                   num_kv_blocks=400, block_size=16)
    out = {}
    with orca_compile.optimize(MODEL, **options) as engine:
        for rounds in range(4):  # prefill-heavy: 4 fresh prompts at once (the first round warms up)
            for i in range(PREFILL["requests"]):
                engine.add_request(f"p{rounds}-{i}", [(7 * i + j) % 50000 + 1 for j in range(PREFILL["prompt"])],
                                   SamplingParams(max_tokens=1, ignore_eos=True))
            engine.step()
            if rounds:
                out.setdefault("prefill", []).append(engine.last_iteration.forward_seconds)
        for i in range(DECODE["requests"]):
            engine.add_request(f"d{i}", [(11 * i + j) % 50000 + 1 for j in range(DECODE["prompt"])],
                               SamplingParams(max_tokens=12, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
            it = engine.last_iteration
            if it.num_decode_tokens == DECODE["requests"] and not it.num_prefill_tokens:
                out.setdefault("decode", []).append(it.forward_seconds)
                out.setdefault("collective", []).append(it.collective_seconds)
    return {k: statistics.median(v) for k, v in out.items()}


def predict(tp: int, machine) -> dict:
    model = load_model(MODEL, dtype=DTYPE)
    cm = orca_compile.compile(model, backend="auto", keep_stages=False, tensor_parallel_size=tp, rank=0)
    cost = graph_cost(cm.graph_module)
    p, n = PREFILL["prompt"], PREFILL["requests"]
    prefill = cost.predict_seconds(machine, n * p, n, n * p * (p + 1) // 2, n * p)
    ctx = DECODE["prompt"] + 6  # the median decode step's context
    d = DECODE["requests"]
    decode = cost.predict_seconds(machine, d, d, d * ctx, d * ctx)
    return {"prefill": prefill, "decode": decode}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    report = {}
    for tp in (1, 2):
        machine = measure_machine(getattr(torch, DTYPE), world_size=tp)
        predicted, measured = predict(tp, machine), measure(tp)
        report[f"tp{tp}"] = {"machine": machine.__dict__, "predicted": predicted, "measured": measured}
        print(f"tp={tp}: machine {machine.flops_per_second / 1e9:.0f} GFLOP/s, "
              f"{machine.memory_bytes_per_second / 1e9:.1f} GB/s, link {machine.link_bytes_per_second / 1e9:.2f} GB/s "
              f"+ {machine.link_latency_seconds * 1e6:.0f} us, op {machine.op_overhead_seconds * 1e6:.1f} us")
        for kind in ("prefill", "decode"):
            pr, me = predicted[kind], measured[kind]
            print(f"  {kind:8} predicted {pr['total'] * 1e3:7.1f} ms (compute {pr['compute'] * 1e3:.1f}, memory "
                  f"{pr['memory'] * 1e3:.1f}, communication {pr['communication'] * 1e3:.1f}, overhead "
                  f"{pr['overhead'] * 1e3:.1f}); measured {me * 1e3:7.1f} ms; error {pr['total'] / me - 1:+.0%}")
        if "collective" in measured:
            print(f"  decode all-reduce wait (rank 0, measured): {measured['collective'] * 1e3:.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
