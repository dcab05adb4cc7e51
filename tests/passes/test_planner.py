"""The planner: its parts add up to the graph's cost, a probe one period deep prices like the whole
model, the integer program and the dynamic program find what exhaustive enumeration (written here,
not in the planner) finds, clusters are validated, and on paper it picks Orca's split for GPT-3."""
from __future__ import annotations

import itertools
import json
import math
import pathlib

import pytest
import sympy
import transformers as tf

from orca_compile.passes.partition.cost_model import graph_cost
from orca_compile.passes.partition.planner import KINDS, Cluster, Planner, Workload, choose, profile
from orca_compile.planning import model_profile, probe_config
from tests.conftest import compiled_preset

ROOT = pathlib.Path(__file__).resolve().parents[2]
CLUSTERS = ROOT / "examples" / "clusters"
GPU = dict(nodes=1, devices_per_node=4, device_memory_gib=80, device_tflops=200, device_memory_bandwidth_gbps=2000,
           intra_node_bandwidth_gbps=200, inter_node_bandwidth_gbps=25)
SMALL = Workload(batch_size=4, context_len=64, prefill_tokens=64, prompt_len=16)


def _gemma(layers):
    return tf.Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=512,
                           sliding_window=16, dtype="float32")


def test_the_parts_add_up_to_the_graph_cost():
    _, cm = compiled_preset("tiny-llama")
    final = cm.stages["final"]
    whole = graph_cost(final)
    parts = profile(final, max_tensor_parallel=1).parts[1]
    everything = [*parts.layer.values(), parts.prelude, parts.head, parts.epilogue]
    flops = sum((p.matmul_flops for p in everything), sympy.Integer(0))
    assert sympy.expand(flops - whole.matmul_flops) == 0
    assert sum(p.attention_flops_per_key for p in everything) == whole.attention_flops_per_key
    assert sum(sum(p.streamed.values()) for p in everything) == whole.weight_bytes
    assert {k for _, k in parts.layer} == {"attention", "mlp", "rest"}
    assert parts.head.matmul_flops != 0 and parts.layer[0, "mlp"].matmul_flops != 0


def test_a_probe_one_period_deep_prices_like_the_whole_model():
    """Gemma-2's layers alternate sliding and full attention: a 2-layer probe of a 6-layer model
    gives the same plan prices, layer by layer, as capturing all 6 (both on meta tensors)."""
    config = _gemma(6)
    probe, classes = probe_config(config)
    assert probe.num_hidden_layers == 2 and classes == [0, 1, 0, 1, 0, 1]
    short = model_profile(config, max_tensor_parallel=2)
    full = model_profile(config, max_tensor_parallel=2, exact_depth=True)
    assert short.num_layers == full.num_layers == 6
    for t, pp, replicated in [(1, 1, ()), (2, 1, ()), (1, 3, ()), (2, 2, [("mlp", 3), ("attention", 4)])]:
        a = Planner(short, Cluster(**GPU), SMALL).price(t, pp, replicated=replicated)
        b = Planner(full, Cluster(**GPU), SMALL).price(t, pp, replicated=replicated)
        for kind in ("decode", "prefill"):
            assert a.stage_seconds[kind] == pytest.approx(b.stage_seconds[kind], rel=1e-12)
        assert [m["total"] for m in a.memory_bytes] == [m["total"] for m in b.memory_bytes]
    # the sliding layers see 16 keys, the full ones the whole context: a probe keeps both kinds
    windows = {short.parts[1].layer[c, "attention"].sliding_window for c in (0, 1)}
    assert windows == {0, 16}


def _all_blocks(num_layers):
    return [(k, layer) for layer in range(num_layers) for k in KINDS]


@pytest.mark.parametrize("link_gbps", [0.05, 200.0])
def test_the_integer_program_finds_the_best_sharding_that_fits(link_gbps):
    """Between the memory of everything whole and everything sharded, with a slow or a fast link:
    the planner's choice equals the best of all 2^5 choices (4 blocks and the head), enumerated."""
    config = tf.LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=4, vocab_size=4096, max_position_embeddings=512, dtype="float32")
    prof = model_profile(config, max_tensor_parallel=2)
    loose = Planner(prof, Cluster(**GPU), SMALL)
    whole = loose.price(2, 1, replicated=_all_blocks(2)).memory_bytes[0]["total"]
    sharded = loose.price(2, 1, vocab_parallel_head=True).memory_bytes[0]["total"]
    assert sharded < whole
    limit = (whole + sharded) / 2
    cluster = Cluster(**{**GPU, "device_memory_gib": limit / 2**30, "memory_utilization": 1.0,
                         "intra_node_bandwidth_gbps": link_gbps, "intra_node_latency_us": 0.0,
                         "op_overhead_us": 0.0})
    planner = Planner(prof, cluster, SMALL)
    best = planner.best(2, 1)
    candidates = []
    for mask in itertools.product([False, True], repeat=5):
        replicated = [b for b, whole_ in zip(_all_blocks(2), mask[:4]) if whole_]
        p = planner.price(2, 1, replicated=replicated, vocab_parallel_head=mask[4])
        if p.memory_bytes[0]["total"] <= limit:
            candidates.append(p.iteration_seconds())
    assert best is not None and best.memory_bytes[0]["total"] <= limit
    assert best.iteration_seconds() == pytest.approx(min(candidates), rel=1e-9)
    assert planner.ilp_solves >= 1
    if link_gbps < 1:  # a dear link: as few all-reduces as the memory allows, so some blocks stay whole
        assert best.replicated
    else:  # a cheap one (no latency, no launch cost): shard everything
        assert not best.replicated and best.vocab_parallel_head


@pytest.mark.parametrize("objective", ["latency", "throughput"])
def test_the_dynamic_program_finds_the_best_cuts(objective):
    """Every way to cut 6 layers into 3 stages, enumerated: the planner's cuts have the least
    latency (and, among those, the least bottleneck), or the least bottleneck under a bound."""
    prof = model_profile(_gemma(6), max_tensor_parallel=1)
    planner = Planner(prof, Cluster(**GPU), SMALL, objective=objective,
                      latency_bound=None if objective == "latency" else 1.0)
    best = planner.best(1, 3)
    every = [planner.price(1, 3, cuts=[0, a, b, 6]) for a in range(1, 5) for b in range(a + 1, 6)]
    if objective == "latency":
        least = min(p.iteration_seconds() for p in every)
        assert best.iteration_seconds() == pytest.approx(least, rel=1e-9)
        ties = [p for p in every if p.iteration_seconds() <= least * (1 + 1e-9)]
        assert max(best.stage_seconds["decode"]) == pytest.approx(min(max(p.stage_seconds["decode"]) for p in ties))
    else:
        assert max(best.stage_seconds["decode"]) == pytest.approx(min(max(p.stage_seconds["decode"]) for p in every))
    assert best.cuts[0] == 0 and best.cuts[-1] == 6 and len(best.cuts) == 4


def test_a_latency_bound_trades_throughput_for_latency():
    prof = model_profile(_gemma(6), max_tensor_parallel=1)
    free = Planner(prof, Cluster(**GPU), SMALL, objective="throughput").plans(4)
    fastest = min(p.iteration_seconds() for p in free)
    bounded = Planner(prof, Cluster(**GPU), SMALL, objective="throughput", latency_bound=fastest * 1.0001).plans(4)
    assert bounded[0].iteration_seconds() <= fastest * 1.0001
    assert bounded[0].tokens_per_second() <= free[0].tokens_per_second()


def test_a_model_that_fits_nowhere_is_a_value_error_naming_the_memory():
    prof = model_profile("tiny-llama", max_tensor_parallel=2)
    tiny = Cluster(**{**GPU, "device_memory_gib": 1e-6})
    with pytest.raises(ValueError, match="no plan fits 2 devices of 1e-06 GiB"):
        choose(prof, tiny, devices=2, workload=SMALL)


@pytest.mark.parametrize("bad,match", [({"nodes": 0}, "nodes must be an integer >= 1"),
                                       ({"device_tflops": -1}, "device_tflops must be a number >= 0"),
                                       ({"device_memory_gib": "80"}, "device_memory_gib must be a number"),
                                       ({"memory_utilization": 1.5}, r"memory_utilization must be in \(0, 1\]"),
                                       ({"nvlink": 1}, "unknown keys \\['nvlink'\\]")])
def test_a_bad_cluster_is_a_value_error_naming_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        Cluster.from_dict({**GPU, **bad})
    missing = dict(GPU)
    del missing["device_tflops"]
    with pytest.raises(ValueError, match="missing \\['device_tflops'\\]"):
        Cluster.from_dict(missing)


def test_the_example_clusters_load():
    files = sorted(CLUSTERS.glob("*.json"))
    assert len(files) >= 3
    for f in files:
        c = Cluster.load(f)
        assert c.num_devices == c.nodes * c.devices_per_node >= 8 and c.name == f.stem
        assert json.loads(f.read_text())["comment"]


@pytest.mark.slow
def test_on_paper_gpt3_175b_on_orcas_testbed_gets_orcas_split():
    """Orca served GPT-3 175B on two 8-GPU A100-40GB nodes as 8-way tensor parallelism within a node
    and 2 pipeline stages across them (OSDI '22, section 6). From the config alone, on meta tensors."""
    cluster = Cluster.load(CLUSTERS / "2x-azure-nd96asr-a100-40gb.json")
    prof = model_profile(ROOT / "examples" / "configs" / "gpt3-175b", max_tensor_parallel=16)
    plans = choose(prof, cluster, workload=Workload(batch_size=8, context_len=1024))
    best = plans[0]
    assert (best.tensor_parallel_size, best.pipeline_parallel_size) == (8, 2)
    assert abs((best.cuts[1] - best.cuts[0]) - (best.cuts[2] - best.cuts[1])) <= 4  # near-even stages
    assert max(m["total"] for m in best.memory_bytes) <= cluster.memory_bytes
    weights = sum(m["weights"] for m in best.memory_bytes) * 8  # 8 ranks a stage
    h, vocab, positions = 12288, 50257, 2048
    layers = 96 * 12 * h * h * 2  # 175B parameters in float16, sharded 8 ways: one copy over 8 ranks
    embeddings = 8 * (vocab + positions) * h * 2  # on each rank of the first stage
    head = 8 * vocab * h * 2  # the tied head: a copy on each rank of the last stage, another device
    assert weights == pytest.approx(layers + embeddings + head, rel=2e-3)  # + norms and biases
    assert math.isfinite(best.predicted_iteration_seconds)


def test_an_iterations_query_key_pairs_count_each_new_token_s_visible_keys():
    from orca_compile.passes.partition.planner import Iteration

    for new, ctx, window in itertools.product([1, 3, 7, 16], [16, 20, 40], [0, 1, 5, 16, 50]):
        if new > ctx:
            continue
        it = Iteration("any", 2, new, ctx)
        want = 2 * sum(min(p, window) if window else p for p in range(ctx - new + 1, ctx + 1))
        assert it.pairs(window) == want
        assert it.keys(window) == 2 * (min(ctx, window) if window else ctx)
