"""The planner on this machine: every plan it considers with up to 2 processes, its predicted
iteration time against the measured one, on W1's model (GPT-2 small shape, float32), for a
prefill-heavy and a decode-heavy iteration; and whether the plan it chooses is within 15% of the
best measured one.

    python benchmarks/planner_check.py [--json out.json] [--plot out.png]

Plans: the planner's best of each (tp, pp) on 1 and 2 processes (as ``orca_compile.planning.plan``
does, this machine measured once per process count, a plan on fewer processes giving each more
threads; here the measurements are taken once and every plan is priced on them), plus Megatron's tp = 2 with every block sharded, priced by the same model, so that the
comparison has a tensor-parallel plan even where the planner's integer program keeps blocks
whole. Measured: the engine's ``forward_seconds`` of that iteration (the last stage's, which
waits for the earlier ones), the median of several, each plan in its own engine.
The plot needs matplotlib (``pip install matplotlib``).
"""
from __future__ import annotations

import argparse
import json
import statistics

import orca_compile
from orca_compile import SamplingParams
from orca_compile.host_probes import settle
from orca_compile.passes.partition.planner import Planner, Workload, rank_plans
from orca_compile.planning import local_cluster, model_profile

MODEL, DTYPE = "gpt2-small-random", "float32"
PREFILL = dict(requests=4, prompt=128)  # one iteration of 4 x 128 new tokens
DECODE = dict(requests=32, prompt=96, steps=12)  # 32 decodes over contexts of ~100 tokens
WORKLOAD = Workload(batch_size=DECODE["requests"], context_len=DECODE["prompt"] + DECODE["steps"] // 2,
                    prefill_tokens=PREFILL["requests"] * PREFILL["prompt"], prompt_len=PREFILL["prompt"])


def measure(p) -> dict:
    # one iteration at a time: the planner's latency is one iteration's way through every stage
    options = dict(dtype=DTYPE, max_num_seqs=32, max_num_batched_tokens=512, num_kv_blocks=400, block_size=16,
                   max_in_flight=1)
    out = {}
    with orca_compile.optimize(MODEL, plan=p, **options) as engine:
        for rounds in range(4):  # prefill-heavy: 4 fresh prompts at once (the first round warms up)
            for i in range(PREFILL["requests"]):
                engine.add_request(f"p{rounds}-{i}", [(7 * i + j) % 50000 + 1 for j in range(PREFILL["prompt"])],
                                   SamplingParams(max_tokens=1, ignore_eos=True))
            engine.step()
            if rounds:
                out.setdefault("prefill", []).append(engine.last_iteration.forward_seconds)
        for i in range(DECODE["requests"]):
            engine.add_request(f"d{i}", [(11 * i + j) % 50000 + 1 for j in range(DECODE["prompt"])],
                               SamplingParams(max_tokens=DECODE["steps"], ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
            it = engine.last_iteration
            if it.num_decode_tokens == DECODE["requests"] and not it.num_prefill_tokens:
                out.setdefault("decode", []).append(it.forward_seconds)
    return {k: statistics.median(v) for k, v in out.items()}


def label(p) -> str:
    extra = ""
    if p.tensor_parallel_size > 1:
        extra = f", {len(p.replicated)} blocks whole" if p.replicated else ", all sharded"
        extra += ", vocab-par. head" if p.vocab_parallel_head else ""
    return f"tp{p.tensor_parallel_size} pp{p.pipeline_parallel_size}{extra}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    prof = model_profile(MODEL, dtype=DTYPE, max_tensor_parallel=2)
    report = {"model": MODEL, "dtype": DTYPE, "workload": WORKLOAD.__dict__, "kinds": {}}
    # this machine measured once per process count; every plan is priced on these
    settle(5)  # until the host leaves the CPUs alone: the rates are the model's constants
    clusters = {world: local_cluster(world) for world in (1, 2)}
    report["clusters"] = {world: c.__dict__ for world, c in clusters.items()}
    plans_by_label = {}
    chosen = {}
    for kind in ("prefill", "decode"):
        plans = [p for world, c in clusters.items() for p in Planner(prof, c, WORKLOAD, iteration=kind).plans(world)
                 if p.num_devices == world]
        plans = rank_plans(plans, kind)
        chosen[kind] = label(plans[0])
        for p in plans:
            plans_by_label.setdefault(label(p), p)
    considered = set(plans_by_label)
    megatron = Planner(prof, clusters[2], WORKLOAD).price(2, 1)
    plans_by_label.setdefault(label(megatron), megatron)
    rows = []
    for name, p in plans_by_label.items():
        measured = measure(p)
        for kind in ("prefill", "decode"):
            pr = p.iteration_seconds(kind)
            rows.append({"plan": name, "kind": kind, "predicted": pr, "measured": measured[kind],
                         "error": pr / measured[kind] - 1, "considered": name in considered})
            print(f"{name:38} {kind:8} predicted {pr * 1e3:7.1f} ms  measured {measured[kind] * 1e3:7.1f} ms  "
                  f"error {pr / measured[kind] - 1:+.0%}")
    for kind in ("prefill", "decode"):
        mine = [r for r in rows if r["kind"] == kind and r["considered"]]
        best = min(r["measured"] for r in mine)
        got = next(r["measured"] for r in mine if r["plan"] == chosen[kind])
        report["kinds"][kind] = {"chosen": chosen[kind], "chosen_measured": got, "best_measured": best,
                                 "within": got / best - 1}
        print(f"{kind}: chose {chosen[kind]}, measured {got * 1e3:.1f} ms; best measured {best * 1e3:.1f} ms "
              f"({got / best - 1:+.1%})")
    report["rows"] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, kind in zip(axes, ("prefill", "decode")):
            mine = [r for r in rows if r["kind"] == kind]
            xs = range(len(mine))
            ax.bar([x - 0.2 for x in xs], [r["predicted"] * 1e3 for r in mine], 0.4, label="predicted")
            ax.bar([x + 0.2 for x in xs], [r["measured"] * 1e3 for r in mine], 0.4, label="measured")
            ax.set_xticks(list(xs), [r["plan"].replace(", ", "\n") for r in mine], fontsize=7)
            ax.set_ylabel("iteration (ms)")
            ax.set_title(f"{kind}: chose {chosen[kind]}")
            ax.legend()
        fig.suptitle(f"planner: predicted vs measured iteration time, {MODEL} {DTYPE}, this machine")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
