"""executor="multiproc": tensor-parallel ranks, pipeline stages, or both, as real processes over gloo,
started by the engine.

The oracle: HF's greedy decoding of each prompt alone (tokens), HF's float64 log-probs of those
tokens (within 1e-6) and the one-process engine on the same requests (log-probs within 1e-9: the
all-reduce sums two partial products, which reorders a float64 sum), with staggered arrivals and
a cache small enough to preempt. A killed worker is an error from the engine within a second, a
stuck collective within its timeout; no process outlives its engine."""
from __future__ import annotations

import functools
import multiprocessing
import time

import pytest
import torch

import orca_compile
from orca_compile import SamplingParams
from orca_compile.presets import load_model
from tests.conftest import hf_oracle

FAMILIES = ["tiny-gpt2", "tiny-llama", "tiny-qwen2", "tiny-llama-mqa", "tiny-gemma2"]
# (arrival iteration, prompt, max_tokens): the last two arrive while the first ones decode
PLAN = [(0, [5, 17, 3, 99, 4, 8, 1, 2, 3], 6), (0, [42, 7], 8), (2, [8, 9, 10, 11, 12], 5), (3, [3, 1], 7)]
OPTIONS = dict(dtype="float64", num_kv_blocks=7, block_size=4, max_num_seqs=4, max_num_batched_tokens=8)


@functools.lru_cache(maxsize=None)
def _one_process(name):
    """The one-process engine's outputs on PLAN (computed once per family for both splits)."""
    with orca_compile.optimize(name, **OPTIONS) as local:
        return _serve(local)[0]


def _serve(engine):
    out, step = {}, 0
    pending = list(enumerate(PLAN))
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][1][0] <= step:
            i, (_, prompt, n) = pending.pop(0)
            engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=n, ignore_eos=True, logprobs=True))
        for o in engine.step():
            if o.finished:
                out[o.request_id] = (o.token_ids, o.logprobs)
        step += 1
    return out, engine.stats()["num_preemptions"]


def _hf(model, prompt, n):
    """HF's greedy tokens with nothing suppressed (generate's min_new_tokens would mask EOS, and the
    engine's ignore_eos does not: it only keeps going after one)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def _hf_logprobs(model, prompt, tokens):
    """HF's log-prob of each of ``tokens`` after ``prompt``: one float64 forward of the eager model."""
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt) + list(tokens[:-1])])).logits[0, len(prompt) - 1:]
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist()


SPLITS = {"tp2": (2, 1), "pp2": (1, 2), "tp2xpp2": (2, 2)}
# Tensor parallel on every family: it cuts inside attention and the MLP, where they differ (fused
# QKV and Conv1D in GPT-2, biases in Qwen2, one KV head replicated in Llama-MQA, Gemma2's soft-caps
# and windows), plus attention sinks cut by heads (GPT-OSS, whose experts run whole on each rank)
# and a mixture of experts beside sharded attention (Mixtral). Pipeline stages cut between layers:
# what differs by family there is the prelude and epilogue each stage recomputes or skips (GPT-2's
# learned positions and LayerNorm, Llama's rotary tables, Gemma2's scaled embeddings and final
# soft-cap), so pp2 runs on those three, and both at once on two of them (a rank of a stage: the
# two rewrites composed), to keep the suite within its time.
PIPELINE_FAMILIES = {"pp2": ["tiny-gpt2", "tiny-llama", "tiny-gemma2"], "tp2xpp2": ["tiny-gpt2", "tiny-gemma2"]}
CASES = ([(name, "tp2") for name in FAMILIES + ["tiny-gpt-oss", "tiny-mixtral"]]
         + [(name, split) for split, names in PIPELINE_FAMILIES.items() for name in names])


@pytest.mark.parametrize("name,split", CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_two_ranks_give_hf_tokens_and_the_one_process_log_probs(name, split):
    """With pipeline stages, as many iterations as stages are in flight (Orca's pipelining)."""
    tp, pp = SPLITS[split]
    want = _one_process(name)
    with orca_compile.optimize(name, tensor_parallel_size=tp, pipeline_parallel_size=pp, **OPTIONS) as engine:
        assert type(engine.executor).__name__ == "MultiprocExecutor"
        assert engine.max_in_flight == pp and len(engine.executor.processes) == tp * pp
        procs = list(engine.executor.processes)
        got, preemptions = _serve(engine)
    assert preemptions > 0  # the cache was short: requests were preempted and recomputed
    model = hf_oracle(load_model(name, dtype=torch.float64))
    for i, (_, prompt, n) in enumerate(PLAN):
        tokens, logprobs = got[f"r{i}"]
        assert tokens == want[f"r{i}"][0] == _hf(model, prompt, n)
        assert max(abs(a - b) for a, b in zip(logprobs, want[f"r{i}"][1])) < 1e-9
        assert max(abs(a - b) for a, b in zip(logprobs, _hf_logprobs(model, prompt, tokens))) < 1e-6
    assert not any(p.is_alive() for p in procs)


def test_a_killed_worker_is_an_error_within_a_second_and_nothing_is_left():
    engine = orca_compile.optimize("tiny-llama", tensor_parallel_size=2, **OPTIONS)
    procs = list(engine.executor.processes)
    try:
        engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=20, ignore_eos=True))
        engine.step()
        procs[1].kill()
        procs[1].join(timeout=10)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"rank 1 \(pid \d+\) died"):
            while True:  # the dead rank is found at the next step
                engine.step()
        assert time.monotonic() - start < 1.0
        with pytest.raises(RuntimeError, match="the workers failed earlier"):  # and nothing stale after
            engine.step()
    finally:
        engine.shutdown()
    assert not any(p.is_alive() for p in procs)
    assert not multiprocessing.active_children()


def test_a_stuck_collective_is_an_error_within_the_collective_timeout():
    """A rank that stops answering (SIGSTOP: alive, but never reaching the all-reduce) leaves its
    peer waiting in the collective; gloo's timeout (here 3 s) fails it there, the peer reports it,
    and the engine raises within the timeout plus a poll, naming the rank. No process is left."""
    import os
    import signal

    from orca_compile.runtime.executor import register_executor, unregister_executor
    from orca_compile.runtime.multiproc_executor import MultiprocExecutor

    class QuickTimeout(MultiprocExecutor):
        def __init__(self, source, seed=0):
            super().__init__(source, seed, collective_timeout=3.0)

    register_executor("multiproc-3s", QuickTimeout)
    try:
        engine = orca_compile.optimize("tiny-llama", tensor_parallel_size=2, executor="multiproc-3s", **OPTIONS)
        procs = list(engine.executor.processes)
        try:
            engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=20, ignore_eos=True))
            engine.step()
            os.kill(procs[1].pid, signal.SIGSTOP)
            start = time.monotonic()
            with pytest.raises(RuntimeError, match=r"rank 0 failed"):
                engine.step()
            assert time.monotonic() - start < 3.0 + 5.0  # the timeout, and the report's way back
        finally:
            engine.shutdown()  # kills the stopped rank
        assert not any(p.is_alive() for p in procs)
        assert not multiprocessing.active_children()
    finally:
        unregister_executor("multiproc-3s")


def test_a_size_the_ranks_do_not_divide_is_a_value_error_from_the_worker():
    # both ranks fail alike; whichever reports first is named
    with pytest.raises(ValueError, match=r"rank [012]: tensor_parallel_size=3 does not divide the 4 query heads"):
        orca_compile.optimize("tiny-llama", tensor_parallel_size=3, **OPTIONS)
    assert not multiprocessing.active_children()


@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-gpt2"])
def test_a_plan_with_whole_blocks_and_a_vocab_parallel_head_runs_exactly(name):
    """The planner's intra-operator choices, run: one attention and one MLP block kept whole on
    both ranks, the rest sharded, and the LM head split by vocabulary with its logits gathered
    (Gemma-2's soft-cap follows the gather; GPT-2's projections are addmm). HF's tokens, the
    one-process log-probs; the ranks' graphs hold what the plan says."""
    from orca_compile.passes.partition.planner import Cluster, Planner
    from orca_compile.planning import model_profile

    cluster = Cluster(nodes=1, devices_per_node=2, device_memory_gib=1, device_tflops=1,
                      device_memory_bandwidth_gbps=10, intra_node_bandwidth_gbps=1, inter_node_bandwidth_gbps=1)
    plan = Planner(model_profile(name, dtype="float64", max_tensor_parallel=2), cluster).price(
        2, 1, replicated=[("attention", 1), ("mlp", 0)], vocab_parallel_head=True)
    want = _one_process(name)
    with orca_compile.optimize(name, plan=plan, **OPTIONS) as engine:
        assert engine.plan is plan
        got, _ = _serve(engine)
    model = load_model(name, dtype=torch.float64)
    for i, (_, prompt, n) in enumerate(PLAN):
        tokens, logprobs = got[f"r{i}"]
        assert tokens == want[f"r{i}"][0] == _hf(model, prompt, n)
        assert max(abs(a - b) for a, b in zip(logprobs, want[f"r{i}"][1])) < 1e-9
    shard = orca_compile.compile(model, tensor_parallel_size=2, rank=1, replicated=plan.replicated,
                                 vocab_parallel_head=True).graph_module
    counts = {}
    for n in shard.graph.nodes:
        counts[str(n.target)] = counts.get(str(n.target), 0) + 1
    assert counts.get("orca.all_reduce.default") == 2  # attention 0 and MLP 1; the whole blocks need none
    assert counts.get("orca.all_gather.default") == 1
    heads = [int(n.args[0].meta["val"].shape[1]) for n in shard.graph.find_nodes(
        op="call_function", target=torch.ops.orca.attention.default)]
    assert heads == [model.config.num_attention_heads // 2, model.config.num_attention_heads]
