"""Scheduling policies beyond Orca's FCFS: priority, static (request-level batching) and FastServe's
skip-join MLFQ. Their decisions on the scheduler alone (no model), and every request's tokens and
log-probs against HF under each of them with the engine (float64)."""
import random

import pytest
import torch

import orca_compile
from orca_compile import SamplingParams
from orca_compile.config import EngineConfig
from orca_compile.runtime.block_manager import KVBlockManager
from orca_compile.runtime.policy import MLFQ
from orca_compile.runtime.request import Request
from orca_compile.runtime.scheduler import Scheduler
from tests.acceptance.test_engine_vs_hf import (assert_drained, check_against_hf, hf_generate, random_workload,
                                                serve)
from tests.conftest import compiled_preset


class Sim:
    """The scheduler driven as the engine drives it, every request sampling token 7; records which
    requests each iteration ran and when each finished."""

    def __init__(self, num_blocks=64, block_size=4, **kw):
        self.s = Scheduler(EngineConfig(num_kv_blocks=num_blocks, block_size=block_size, **kw),
                           KVBlockManager(num_blocks, block_size))
        self.arrivals = 0
        self.iteration = 0
        self.ran: list[list[str]] = []
        self.finished: dict[str, int] = {}

    def add(self, rid, prompt_len, max_tokens, priority=0):
        req = Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                      self.arrivals, priority=priority)
        self.arrivals += 1
        self.s.add(req)

    def step(self):
        self.complete(self.s.schedule())
        self.iteration += 1

    def complete(self, out):
        """The iteration ``out`` ran: every request that samples gets token 7."""
        self.ran.append(list(out.request_ids))
        for req, _ in self.s.update(out, [7] * sum(out.sample), None):
            if req.status.finished:
                self.finished[req.request_id] = self.iteration

    def busy(self) -> bool:
        return self.s.has_unfinished()

    def drain(self, limit=5000):
        while self.busy():
            self.step()
            assert self.iteration < limit, "no progress"
        assert self.s.num_kv_blocks_used == 0
        self.s.block_manager.check()


def _long_jobs_then_a_short_one(policy):
    sim = Sim(max_num_seqs=2, max_num_batched_tokens=64, policy=policy)
    for i in range(4):
        sim.add(f"long{i}", 8, 60)
    for _ in range(20):
        sim.step()
    sim.add("short", 8, 4)
    sim.drain()
    return sim


def test_a_short_job_behind_long_ones_finishes_earlier_under_mlfq_than_fcfs():
    fcfs, mlfq = _long_jobs_then_a_short_one("fcfs"), _long_jobs_then_a_short_one("mlfq")
    # FCFS: the short job waits for two long ones to finish (head-of-line blocking)
    assert fcfs.finished["short"] > fcfs.finished["long1"]
    # MLFQ: the long jobs have used queue 0's quantum; the short one joins queue 0 and runs at once
    assert mlfq.finished["short"] <= 20 + 5
    assert fcfs.finished["short"] - 20 > 5 * (mlfq.finished["short"] - 20)
    assert sorted(mlfq.finished) == sorted(fcfs.finished)  # everyone finished under both


def test_mlfq_skip_join_and_demotion():
    sim = Sim(max_num_seqs=4, max_num_batched_tokens=256, policy="mlfq", policy_options=dict(quantum=8, num_queues=4))
    policy = sim.s.policy
    assert isinstance(policy, MLFQ) and [policy.quantum_of(i) for i in range(4)] == [8, 16, 32, float("inf")]
    sim.add("short-prompt", 5, 40)
    sim.add("long-prompt", 30, 4)  # 30 > 8 and 16 but <= 32: skips to queue 2
    assert (policy.level["short-prompt"], policy.level["long-prompt"]) == (0, 2)
    sim.step()  # short-prompt ran its 5 prompt tokens: queue 0 still (5 < 8)
    assert policy.level["short-prompt"] == 0
    for _ in range(3):
        sim.step()  # 5 + 3 decode tokens = 8: queue 0's quantum used, down to queue 1
    assert policy.level["short-prompt"] == 1


def _long_job_among_shorts(starvation_iterations):
    sim = Sim(max_num_seqs=1, max_num_batched_tokens=64, policy="mlfq",
              policy_options=dict(quantum=4, num_queues=3, starvation_iterations=starvation_iterations))
    sim.add("long", 4, 150)
    for i in range(120):
        if i % 2 == 0:  # a short job (2 iterations) every 2 iterations: queue 0 is never empty
            sim.add(f"short{i}", 2, 2)
        sim.step()
    return sim, [i for i, ids in enumerate(sim.ran) if "long" in ids]


def test_mlfq_starvation_bound_holds():
    """One slot that the short jobs of queue 0 fill. Without promotion the long job, demoted after
    its first quantum, never runs again; with it, it goes back to queue 0's end each time it has
    waited starvation_iterations, and runs again as soon as the queue-0 jobs ahead of it have
    had their quantum: at least once in every 10 + 2 * (jobs ahead) iterations."""
    sim, runs = _long_job_among_shorts(starvation_iterations=10)
    _, starved = _long_job_among_shorts(starvation_iterations=10_000)
    assert max(starved) < 10 and len(starved) <= 4  # its first quantum, then nothing
    assert len(runs) >= 15 and sim.s.policy.promotions >= 4
    gaps = [b - a for a, b in zip(runs, runs[1:])]
    # each wait: the bound, then the short jobs that entered queue 0 before it (one per 2
    # iterations, 2 iterations each) and were still there; never more than a few dozen here
    assert max(gaps) <= 10 + 2 * 20, gaps
    sim.drain()


def test_mlfq_promotions_do_not_starve_queue_zero():
    """Twelve long jobs take turns in one slot, promoted back to queue 0 as they wait; a short job
    that joins queue 0 meanwhile is served in queue 0's order (first in, first out), not behind
    every promotion that follows it."""
    sim = Sim(num_blocks=256, max_num_seqs=1, max_num_batched_tokens=64, policy="mlfq",
              policy_options=dict(quantum=4, num_queues=3, starvation_iterations=10))
    for i in range(12):
        sim.add(f"long{i}", 4, 200)
    for _ in range(100):
        sim.step()
    sim.add("short", 2, 2)
    start = sim.iteration
    while "short" not in sim.finished:
        sim.step()
        assert sim.iteration - start < 200, "the short job starved"
    assert sim.finished["short"] - start < 60
    assert all(f"long{i}" in sum(sim.ran, []) for i in range(12))  # every long job ran


def test_a_higher_priority_arrival_overtakes_running_ones():
    sim = Sim(max_num_seqs=2, max_num_batched_tokens=64, policy="priority")
    sim.add("low-a", 6, 30, priority=5)
    sim.add("low-b", 6, 30, priority=5)
    for _ in range(3):
        sim.step()
    sim.add("urgent", 6, 3, priority=0)
    sim.step()
    assert "urgent" in sim.ran[-1]  # it displaced a running one at once (no free slot)
    assert sim.s.num_preemptions == 1
    sim.drain()
    assert sim.finished["urgent"] < min(sim.finished["low-a"], sim.finished["low-b"])


def test_static_batching_admits_only_into_an_empty_engine():
    sim = Sim(max_num_seqs=4, max_num_batched_tokens=64, policy="static")
    for i in range(3):
        sim.add(f"first{i}", 4, 3 + 5 * i)  # finish at different times
    sim.step()
    sim.add("late", 4, 2)  # arrives while the batch runs
    sim.drain()
    first_end = max(sim.finished[f"first{i}"] for i in range(3))
    late_start = next(i for i, ids in enumerate(sim.ran) if "late" in ids)
    assert late_start > first_end  # it waited for the whole batch, though slots were free
    assert all("late" not in ids for ids in sim.ran[:first_end + 1])


def test_policy_options_are_checked():
    with pytest.raises(ValueError, match="quantum must be an integer >= 1"):
        EngineConfig(policy="mlfq", policy_options=dict(quantum=0))
    with pytest.raises(ValueError, match="policy 'fcfs'"):
        EngineConfig(policy="fcfs", policy_options=dict(quantum=4))


@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("policy", ["fcfs", "mlfq", "priority", "static"])
def test_every_policy_gives_hf_tokens_under_kv_pressure(policy, mode):
    """Staggered arrivals, chunked prefills, a cache short enough that requests are preempted (by
    recompute, or by swap to the host pool and back): the tokens and log-probs are HF's for every
    request, whatever the order."""
    model, cm = compiled_preset("tiny-llama")
    work = random_workload(cm.vocab_size, 12, seed=5)
    longest = max(len(p) + s.max_tokens for _, p, s, _ in work)
    options = dict(quantum=8) if policy == "mlfq" else {}
    engine = orca_compile.optimize(cm, max_num_seqs=4, max_num_batched_tokens=16, block_size=4,
                                   num_kv_blocks=-(-longest // 4) + 3, policy=policy, policy_options=options,
                                   preemption_mode=mode)
    rng = random.Random(0)
    final = serve(engine, work, priority=lambda: rng.randint(0, 3))
    check_against_hf(model, work, final)
    stats = engine.stats()
    if policy != "static":
        assert stats["num_preemptions"] > 0
        if mode == "swap":  # mostly swapped; recomputed where the pool was full (swapped requests pile up)
            assert stats["num_swaps_out"] + stats["num_recomputes"] == stats["num_preemptions"]
            assert stats["num_swaps_out"] > stats["num_recomputes"]
            assert stats["num_swaps_in"] == stats["num_swaps_out"]
        else:
            assert stats["num_recomputes"] == stats["num_preemptions"] and stats["num_swaps_out"] == 0
    assert stats["host_kv_blocks_used"] == 0
    assert_drained(engine)


def test_bad_priority_is_a_value_error():
    with orca_compile.optimize(compiled_preset("tiny-llama")[1], num_kv_blocks=16) as engine:
        with pytest.raises(ValueError, match="priority must be an integer"):
            engine.add_request("x", [1, 2], priority="high")
        assert not engine.has_unfinished_requests()


def test_priorities_reach_the_scheduler():
    with orca_compile.optimize(compiled_preset("tiny-llama")[1], num_kv_blocks=16, policy="priority") as engine:
        engine.add_request("x", [1, 2], SamplingParams(max_tokens=1), priority=3)
        assert engine.scheduler.requests["x"].priority == 3
        torch.manual_seed(0)
        while engine.has_unfinished_requests():
            engine.step()


def test_generate_takes_priorities_and_serves_the_urgent_prompt_first():
    with orca_compile.optimize(compiled_preset("tiny-llama")[1], num_kv_blocks=64, max_num_seqs=1,
                               policy="priority") as engine:
        finished = []
        params = SamplingParams(max_tokens=4, ignore_eos=True)
        outs = engine.generate([[1, 2, 3], [4, 5, 6], [7, 8]], params, priority=[2, 1, 0],
                               on_step=lambda stats, outs: finished.extend(o.prompt_token_ids[0] for o in outs
                                                                           if o.finished))
        assert [len(o.token_ids) for o in outs] == [4, 4, 4]
        assert finished == [7, 4, 1]  # one slot: strictly by priority
        with pytest.raises(ValueError, match="2 priorities for 3 prompts"):
            engine.generate([[1], [2], [3]], params, priority=[0, 1])


def test_stream_yields_each_steps_tokens_and_serves_others_alongside():
    model, cm = compiled_preset("tiny-llama")
    params = SamplingParams(max_tokens=6, ignore_eos=True, logprobs=True)
    with orca_compile.optimize(cm, num_kv_blocks=32) as engine:
        engine.add_request("other", [9, 8, 7], SamplingParams(max_tokens=3, ignore_eos=True))
        outs = list(engine.stream([1, 2, 3, 4], params))
        assert [len(o.new_token_ids) for o in outs] == [1] * 6 and outs[-1].finished
        assert [t for o in outs for t in o.new_token_ids] == outs[-1].token_ids
        want, _ = hf_generate(model, [1, 2, 3, 4], params)
        assert outs[-1].token_ids == want
        # leaving early aborts the request: its blocks are freed, nothing of it stays
        for out in engine.stream([5, 6], SamplingParams(max_tokens=50, ignore_eos=True)):
            break
        while engine.has_unfinished_requests():
            engine.step()
        assert engine.stats()["kv_blocks_used"] == 0 and not engine.scheduler.requests


def test_cli_demo_and_generate_take_a_policy(capsys):
    from orca_compile.cli import main

    assert main(["demo", "--requests", "4", "--policy", "mlfq"]) == 0
    assert "policy mlfq" in capsys.readouterr().out
    assert main(["generate", "tiny-llama", "--prompt-ids", "1 2 3", "--max-tokens", "3", "--num-kv-blocks", "16",
                 "--policy", "mlfq", "--policy-option", "quantum=4"]) == 0
    assert main(["generate", "tiny-llama", "--prompt-ids", "1 2", "--policy", "mlfq",
                 "--policy-option", "quantum"]) == 2
    assert "--policy-option takes KEY=INTEGER" in capsys.readouterr().err


def test_a_full_host_pool_falls_back_to_recompute_and_an_abort_frees_host_blocks():
    sim = Sim(num_blocks=6, block_size=4, max_num_seqs=4, max_num_batched_tokens=64, preemption_mode="swap",
              num_host_kv_blocks=3)
    s = sim.s
    sim.add("a", 8, 10)  # 18 tokens: 5 of the 6 blocks, so each can finish alone
    sim.add("b", 8, 10)
    sim.add("c", 8, 10)
    sim.step()  # a and b admitted with 2 blocks each, c with 2: the 6 blocks are taken
    while s.num_swaps_out + s.num_recomputes < 2:
        sim.step()
    # the first victim (c, the latest) went to the host pool; the pool then had no room for the
    # second (3 host blocks, c holds 2 of them, a victim holds 2 or more): it was recomputed
    assert (s.num_swaps_out, s.num_recomputes) == (1, 1) and s.swapped == {"c"}
    assert s.host_block_manager.num_used_blocks == s.host_block_manager.blocks_for(s.requests["c"].num_computed_tokens)
    # the swap-out copies reached the runner with the next decision that ran
    s.abort("c")
    assert s.host_block_manager.num_used_blocks == 0 and not s.swapped
    s.host_block_manager.check()
    sim.drain()


def test_swap_copies_go_out_before_in_and_only_with_a_decision_that_runs():
    sim = Sim(num_blocks=4, block_size=4, max_num_seqs=2, max_num_batched_tokens=64, preemption_mode="swap")
    sim.add("a", 6, 9)  # 14 tokens: 4 blocks, the whole cache, so one runs at a time at the end
    sim.add("b", 6, 9)
    outs = []
    s = sim.s
    for _ in range(40):
        out = s.schedule()
        outs.append(out)
        s.update(out, [7] * sum(out.sample), None)
        if not s.has_unfinished():
            break
    swapped_out = [pair for o in outs for pair in o.swap_out]
    swapped_in = [pair for o in outs for pair in o.swap_in]
    assert swapped_out and len(swapped_in) == len(swapped_out)
    assert all(o.request_ids for o in outs if o.swap_out or o.swap_in)
    # each swap-in reads host blocks that an earlier (or the same) decision wrote
    written = set()
    for o in outs:
        written |= {h for _, h in o.swap_out}
        assert {h for h, _ in o.swap_in} <= written


@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("policy", ["fcfs", "priority", "static", "mlfq"])
def test_soak_a_thousand_requests_with_aborts_priorities_and_bad_ones(policy, mode):
    """1000 requests arriving at random, with random priorities; some aborted at random points
    (waiting, running, swapped out), bad ones mixed in. Each request that is not aborted finishes
    exactly once with its length; nothing comes after a final output or an abort; the engine
    drains to zero blocks on the device and in the host pool, its accounting intact."""
    _, cm = compiled_preset("tiny-llama")
    rng = random.Random(f"{policy}-{mode}")  # str seeds are deterministic (hash() of a str is not)
    engine = orca_compile.optimize(cm, max_num_seqs=8, max_num_batched_tokens=32, block_size=4, num_kv_blocks=24,
                                   policy=policy, preemption_mode=mode, num_host_kv_blocks=12,
                                   policy_options=dict(quantum=8, starvation_iterations=40) if policy == "mlfq" else {})
    bad = [([], SamplingParams(max_tokens=2)),  # empty prompt
           ([1, cm.vocab_size], SamplingParams(max_tokens=2)),  # a token outside the vocabulary
           ([1] * 90, SamplingParams(max_tokens=20))]  # needs more blocks than the cache has
    expected, done, aborted, added, refused, iteration = {}, set(), set(), 0, 0, 0
    while added < 1000 or engine.has_unfinished_requests():
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3]) if added < 1000 else 0):
            rid = f"r{added}"
            n = rng.randint(1, 12)
            engine.add_request(rid, [rng.randrange(1, cm.vocab_size) for _ in range(rng.randint(1, 30))],
                               SamplingParams(max_tokens=n, ignore_eos=True), priority=rng.randint(0, 3))
            expected[rid], added = n, added + 1
        if rng.random() < 0.05:
            prompt, params = rng.choice(bad)
            with pytest.raises(ValueError):
                engine.add_request(f"bad{iteration}", prompt, params)
            refused += 1
        live = [r for r in expected if r not in done and r not in aborted]
        if live and rng.random() < 0.08:
            victim = rng.choice(live)
            assert engine.abort_request(victim).finish_reason == "abort"
            aborted.add(victim)
        for out in engine.step():
            rid = out.request_id
            assert rid not in done and rid not in aborted, f"{rid}: output after its end"
            if out.finished:
                assert len(out.token_ids) == expected[rid] and out.finish_reason == "length", rid
                done.add(rid)
        iteration += 1
        assert iteration < 50_000, "no progress"
    assert done | aborted == set(expected) and not done & aborted and refused > 10 and len(aborted) > 20
    stats = engine.stats()
    assert (stats["kv_blocks_used"], stats["host_kv_blocks_used"], stats["num_waiting"], stats["num_running"]) == (0,) * 4
    engine.block_manager.check()
    if mode == "swap":
        engine.scheduler.host_block_manager.check()
        assert not engine.scheduler.swapped
    if policy != "static":  # a static batch grows into a cache it was admitted to: rarely preempted
        assert stats["num_preemptions"] > 0
        assert stats["num_swaps_out" if mode == "swap" else "num_recomputes"] > 0
    engine.shutdown()


class PipelinedSim(Sim):
    """The scheduler driven as Engine._step drives a pipeline: decisions fill ``depth`` iterations
    in flight, then the oldest completes. ``on_empty(decision)`` sees each decision not run."""

    def __init__(self, depth=2, on_empty=None, **kw):
        super().__init__(**kw)
        self.s.pipeline_depth = self.depth = depth
        self.queue, self.decisions, self.on_empty = [], [], on_empty

    def step(self):
        while len(self.queue) < self.depth:
            out = self.s.schedule()
            if out.is_empty:
                if out.finished_request_ids and self.queue:
                    self.s.defer_finished(out.finished_request_ids)
                if self.on_empty is not None:
                    self.on_empty(out)
                break
            self.decisions.append(out)
            self.queue.append(out)
        if self.queue:
            self.complete(self.queue.pop(0))
        self.iteration += 1

    def busy(self) -> bool:
        return self.s.has_unfinished() or bool(self.queue)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("policy", ["fcfs", "priority", "mlfq"])
def test_no_livelock_with_iterations_in_flight(policy, mode):
    """Two iterations in flight, three requests that each need 5 of the 8 blocks: a request short
    of blocks held by one in flight must wait for them, not preempt itself for a worse one to take
    (it did, for ever, under priority and mlfq)."""
    sim = PipelinedSim(depth=2, num_blocks=8, block_size=4, max_num_seqs=2, max_num_batched_tokens=16,
                       policy=policy, preemption_mode=mode)
    for rid in "abc":
        sim.add(rid, 15, 3)
    sim.drain(limit=200)
    assert sorted(sim.finished) == ["a", "b", "c"]


def test_aborting_a_request_swapped_out_by_a_decision_not_run_drops_its_copy():
    """An empty decision (pipelining) swaps r2 out; its copy waits for the next decision that runs;
    the user aborts r2 meanwhile. Its host block goes to the next victim: the stale copy must go
    too, or one decision would write that host block twice (index_copy_ keeps either source)."""
    aborted = []

    def abort_swapped(out):
        for rid in out.preempted_request_ids:
            if rid in sim.s.swapped:
                sim.s.abort(rid)
                aborted.append(rid)

    sim = PipelinedSim(depth=2, on_empty=abort_swapped, num_blocks=7, block_size=4, max_num_seqs=4,
                       max_num_batched_tokens=16, preemption_mode="swap", num_host_kv_blocks=3)
    for i, (prompt, max_tokens) in enumerate([(11, 9), (12, 9), (4, 6), (9, 10)]):
        sim.add(f"r{i}", prompt, max_tokens)
    sim.drain(limit=300)
    assert aborted  # the scenario happened
    for out in sim.decisions:
        hosts = [h for _, h in out.swap_out]
        assert len(hosts) == len(set(hosts)), f"a host block written twice in one decision: {out.swap_out}"
    assert sim.s.host_block_manager.num_used_blocks == 0


def test_a_displacing_policy_checks_a_reserved_prompt_against_the_budget_with_its_output():
    """kv_mode="reserve" never preempts under fcfs, so without chunking only the prompt must fit one
    iteration; a displacing policy may preempt, and a recomputed request refeeds prompt + output:
    that must fit, or the request could never run again."""
    cm = compiled_preset("tiny-llama")[1]
    with orca_compile.optimize(cm, num_kv_blocks=16, block_size=4, max_num_batched_tokens=8, kv_mode="reserve",
                               chunked_prefill=False, policy="priority") as engine:
        with pytest.raises(ValueError, match="max_num_batched_tokens=8"):
            engine.add_request("low", list(range(1, 9)), SamplingParams(max_tokens=20))
    with orca_compile.optimize(cm, num_kv_blocks=16, block_size=4, max_num_batched_tokens=8, kv_mode="reserve",
                               chunked_prefill=False) as engine:
        engine.add_request("low", list(range(1, 9)), SamplingParams(max_tokens=20))  # fcfs: fine


def test_static_forms_a_batch_of_max_num_seqs_though_the_budget_runs_one_prompt_at_a_time():
    sim = Sim(max_num_seqs=4, max_num_batched_tokens=8, policy="static")
    for i in range(6):
        sim.add(f"r{i}", 8, 3)
    sim.step()
    assert sorted(r.request_id for r in sim.s.running) == ["r0", "r1", "r2", "r3"]  # the batch
    sim.drain()
    first_batch_end = max(sim.finished[f"r{i}"] for i in range(4))
    assert min(sim.finished["r4"], sim.finished["r5"]) > first_batch_end


def test_two_streams_read_together_and_steps_by_others_lose_nothing():
    _, cm = compiled_preset("tiny-llama")
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    with orca_compile.optimize(cm, num_kv_blocks=32) as engine:
        a, b = engine.stream([1, 2, 3], params), engine.stream([4, 5], SamplingParams(max_tokens=3, ignore_eos=True))
        got = {"a": [next(a)], "b": [next(b)]}
        engine.step()  # someone else steps: the streams still get that step's tokens
        got["a"] += list(a)
        got["b"] += list(b)
        for name, outs in got.items():
            assert outs[-1].finished and [t for o in outs for t in o.new_token_ids] == outs[-1].token_ids, name
        # a stream whose request is aborted from outside ends with the abort
        c = engine.stream([7, 8], SamplingParams(max_tokens=30, ignore_eos=True))
        first = next(c)
        engine.abort_request(first.request_id)
        rest = list(c)
        assert len(rest) == 1 and rest[0].finish_reason == "abort"
        assert not engine.has_unfinished_requests() and engine.stats()["kv_blocks_used"] == 0


@pytest.mark.parametrize("policy", ["priority", "mlfq"])
def test_a_better_requests_prefill_does_not_crowd_out_the_decodes(policy):
    # two residents decoding, then a better request with a prompt longer than the budget: its
    # chunks run in every iteration, and so does each resident's decode (the budget holds a token
    # back for each), as under fcfs's decodes-first order
    sim = Sim(max_num_seqs=4, max_num_batched_tokens=16, policy=policy)
    sim.add("a", 4, 100, priority=1)
    sim.add("b", 4, 100, priority=1)
    # mlfq: they use queue 0's and queue 1's quanta (16 + 32 tokens), the newcomer's prompt of 30
    # skip-joins queue 1
    for _ in range(50 if policy == "mlfq" else 2):
        sim.step()
    sim.add("urgent", 30, 2, priority=0)
    while "urgent" not in sim.finished:
        sim.step()
        out = sim.ran[-1]
        assert out[0] == "urgent" and {"a", "b"} <= set(out), out
    # the prompt ran in chunks of 16 - 2 tokens: ceil(30 / 14) = 3 iterations, then its decode
    assert sum("urgent" in r for r in sim.ran) == 4
    sim.drain()


def test_without_chunking_the_decode_reserve_does_not_starve_the_best_request():
    # a prompt as long as the whole budget cannot run while decodes hold tokens back; worse short
    # requests must not take what is left and become decodes in turn (keeping the reserve up for
    # ever): they wait behind it, and it runs once the residents' decodes are done
    sim = Sim(max_num_seqs=8, max_num_batched_tokens=16, policy="priority", chunked_prefill=False)
    sim.add("a", 4, 12, priority=1)
    sim.add("b", 4, 12, priority=1)
    sim.step()
    sim.add("urgent", 16, 2, priority=0)
    for i in range(40):
        sim.add(f"worse{i}", 2, 30, priority=2)
        sim.step()
        if "urgent" in sim.finished:
            break
    assert "urgent" in sim.finished and sim.finished["urgent"] <= 14, sim.finished
    assert not any(rid.startswith("worse") for ran in sim.ran[:sim.finished["urgent"]] for rid in ran)
    sim.drain()
