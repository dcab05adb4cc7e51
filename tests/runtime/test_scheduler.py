"""The scheduler's decisions on their own (no model): order, budgets, admission, preemption."""
import itertools
import random

import pytest

from orca_compile.config import EngineConfig
from orca_compile.runtime.block_manager import KVBlockManager
from orca_compile.runtime.request import Request, SamplingParams
from orca_compile.runtime.scheduler import Scheduler


def make(num_blocks=64, block_size=4, **kw):
    cfg = EngineConfig(num_kv_blocks=num_blocks, block_size=block_size, **kw)
    return Scheduler(cfg, KVBlockManager(num_blocks, block_size))


_ARRIVALS = itertools.count()


def add(s, rid, n_prompt, max_tokens=8):
    req = Request(rid, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                  next(_ARRIVALS))
    s.add(req)
    return req


def run(s, out, token=7):
    return s.update(out, [token] * sum(out.sample), None)


def test_decodes_first_then_partial_prefills_then_new_requests():
    s = make(max_num_seqs=8, max_num_batched_tokens=10)
    add(s, "a", 3)
    add(s, "b", 20)
    out = s.schedule()
    assert out.request_ids == ["a", "b"] and [len(t) for t in out.new_token_ids] == [3, 7]
    assert out.sample == [True, False]  # b's chunk does not reach its last token
    run(s, out)
    add(s, "c", 4)
    out = s.schedule()
    # a decodes (1), b continues its prompt (9 of 13 left), c waits: the budget is spent
    assert out.request_ids == ["a", "b"] and [len(t) for t in out.new_token_ids] == [1, 9]
    assert (out.num_decode_tokens, out.num_prefill_tokens) == (1, 9)
    run(s, out)
    out = s.schedule()
    assert out.request_ids == ["a", "b", "c"] and [len(t) for t in out.new_token_ids] == [1, 4, 4]
    assert out.num_computed_tokens == [4, 16, 0]
    run(s, out)
    add(s, "d", 1)  # a one-token prompt is a prefill, not a decode
    out = s.schedule()
    assert out.request_ids[-1] == "d" and (out.num_decode_tokens, out.num_prefill_tokens) == (3, 1)


def test_max_num_seqs_bounds_admission_and_a_leaver_makes_room():
    s = make(max_num_seqs=2, max_num_batched_tokens=100)
    add(s, "a", 2, max_tokens=1)
    add(s, "b", 2, max_tokens=5)
    add(s, "c", 2)
    out = s.schedule()
    assert out.request_ids == ["a", "b"]
    run(s, out)  # a finishes (max_tokens=1) and leaves between iterations
    assert "a" not in s.requests and out.request_ids
    out = s.schedule()
    assert out.request_ids == ["b", "c"]


def test_fcfs_head_of_line_blocks_later_requests():
    """The head that does not fit is not overtaken by a smaller later request."""
    s = make(num_blocks=6, block_size=4, max_num_seqs=8, max_num_batched_tokens=100, kv_mode="reserve")
    add(s, "a", 8, max_tokens=9)  # reserves ceil(16/4) = 4 blocks
    add(s, "b", 8, max_tokens=5)  # needs 3: only 2 left
    add(s, "c", 1, max_tokens=2)  # would fit in 1, but must wait behind b
    out = s.schedule()
    assert out.request_ids == ["a"]
    assert s.block_manager.num_used_blocks == 4


def test_paged_preemption_takes_the_latest_arrival_and_requeues_it_first():
    s = make(num_blocks=4, block_size=2, max_num_seqs=8, max_num_batched_tokens=100)
    a = add(s, "a", 4, max_tokens=5)
    b = add(s, "b", 4, max_tokens=5)
    out = s.schedule()  # 2 + 2 blocks: the cache is full
    assert out.request_ids == ["a", "b"] and s.block_manager.num_free_blocks == 0
    run(s, out)  # both now have 5 tokens; feeding the 5th needs a 3rd block each
    add(s, "c", 1)
    out = s.schedule()
    assert out.preempted_request_ids == ["b"] and out.request_ids == ["a"]
    assert b.num_computed_tokens == 0 and b.num_preemptions == 1 and b.num_output_tokens == 1
    assert [r.request_id for r in s.waiting] == ["b", "c"]  # b keeps its place before c
    assert a.num_preemptions == 0
    s.block_manager.check()


def test_a_request_that_cannot_grow_preempts_itself_when_it_is_the_latest():
    s = make(num_blocks=3, block_size=2, max_num_seqs=8, max_num_batched_tokens=100)
    a = add(s, "a", 2, max_tokens=5)  # 6 KV slots at most: the whole cache
    b = add(s, "b", 2, max_tokens=3)
    out = s.schedule()
    assert out.request_ids == ["a", "b"]
    run(s, out)
    out = s.schedule()  # a takes the last block; b cannot grow and is the latest: b goes
    assert out.request_ids == ["a"] and out.preempted_request_ids == ["b"]
    run(s, out)  # every decision's result comes back (until it does, its requests are in flight)
    while a.request_id in s.requests:
        out = s.schedule()
        assert "b" not in out.request_ids or a.status.finished
        run(s, out)
    out = s.schedule()
    assert out.request_ids == ["b"] and out.new_token_ids == [[1, 2, 7]]  # prompt + its kept token
    assert b.num_preemptions == 1


@pytest.mark.parametrize("kv_mode", ["paged", "reserve"])
@pytest.mark.parametrize("seed", range(5))
def test_random_workloads_always_finish_with_exact_block_accounting(kv_mode, seed):
    """Property test: tight caches, random sizes and arrivals. Every request finishes with
    exactly its max_tokens, blocks are exact after every step, the earliest running request is
    never the one preempted, and every iteration respects both budgets."""
    rng = random.Random(seed)
    s = make(num_blocks=rng.randint(6, 12), block_size=rng.choice([1, 2, 4]), max_num_seqs=rng.randint(1, 6),
             max_num_batched_tokens=rng.randint(4, 24), kv_mode=kv_mode)
    cap = s.block_manager.num_blocks * s.block_manager.block_size
    todo = []
    for i in range(20):
        n = rng.randint(1, 12)
        todo.append((rng.randint(0, 40), f"r{i}", n, rng.randint(1, max(1, min(10, cap - n + 1)))))
    todo.sort()
    done, it = {}, 0
    reqs = {}
    while todo or s.has_unfinished():
        while todo and todo[0][0] <= it:
            _, rid, n, m = todo.pop(0)
            reqs[rid] = add(s, rid, n, max_tokens=m)
        earliest = s.running[0].request_id if s.running else None
        out = s.schedule()
        assert earliest not in out.preempted_request_ids
        assert out.num_tokens <= s.config.max_num_batched_tokens
        assert len(out.request_ids) <= s.config.max_num_seqs
        if kv_mode == "reserve":
            assert not out.preempted_request_ids
        for rid, new, computed, table in zip(out.request_ids, out.new_token_ids, out.num_computed_tokens,
                                             out.block_tables):
            assert len(table) * s.block_manager.block_size >= computed + len(new)
        for req, _ in run(s, out, token=rng.randrange(1, 50)):
            if req.status.finished:
                done[req.request_id] = req
        s.block_manager.check()
        it += 1
        assert it < 5000, "no progress"
    assert len(done) == 20
    assert all(r.num_output_tokens == r.params.max_tokens for r in done.values())
    assert s.block_manager.num_used_blocks == 0


def test_strict_admission_waits_behind_a_misfit_and_a_lenient_policy_goes_past_it():
    """The policy's choice, the scheduler's mechanism: with 4 free blocks of 4 tokens, a waiting
    30-token prompt does not fit (chunked prefill off) and a 4-token one behind it does."""
    from orca_compile.runtime.policy import FCFS

    class Lenient(FCFS):
        strict_admission = False

    def schedule_with(policy):
        cfg = EngineConfig(num_kv_blocks=6, block_size=4, chunked_prefill=False, max_num_batched_tokens=64)
        s = Scheduler(cfg, KVBlockManager(6, 4), policy=policy)
        add(s, "a", 8)
        run(s, s.schedule())  # a holds 2 blocks (8 tokens + room for its next)
        add(s, "long", 30)
        add(s, "short", 4)
        return s.schedule().request_ids

    assert schedule_with(FCFS()) == ["a"]  # strict: "short" waits behind "long"
    assert schedule_with(Lenient()) == ["a", "short"]


def test_a_request_in_flight_is_neither_scheduled_again_nor_preempted():
    """Orca's pipelining: two iterations in flight hold disjoint requests; when the blocks run out
    the victim is a request not in flight (a stage may still write the other's K/V); results
    coming back in order make the requests schedulable again."""
    s = make(num_blocks=5, block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    add(s, "a", 8)
    first = s.schedule()
    assert first.request_ids == ["a"] and s.in_flight == {"a"}
    add(s, "b", 8)
    add(s, "c", 4)
    second = s.schedule()
    assert second.request_ids == ["b", "c"] and s.in_flight == {"a", "b", "c"}  # 2 + 2 + 1 blocks: none left
    assert s.schedule().is_empty  # everything is in flight
    run(s, first)
    assert s.in_flight == {"b", "c"}
    # a decodes its 9th token: a 3rd block, none free; b and c (later arrivals) are in flight, so
    # the only victim there may be is a itself
    third = s.schedule()
    assert third.request_ids == [] and third.preempted_request_ids == ["a"]
    assert s.in_flight == {"b", "c"} and s.block_manager.num_used_blocks == 3
    run(s, second)
    fourth = s.schedule()  # b and c decode (3rd block for b: the one a freed); a waits
    assert fourth.request_ids == ["b", "c"] and fourth.preempted_request_ids == []
    s.block_manager.check()


def test_an_abort_in_flight_frees_the_blocks_when_the_iteration_returns():
    s = make(num_blocks=8, block_size=4)
    add(s, "a", 8)
    out = s.schedule()
    assert s.block_manager.num_used_blocks == 2
    s.abort("a")
    assert "a" in s and s.block_manager.num_used_blocks == 2  # a stage may still write them
    with pytest.raises(AssertionError):
        s.add(Request("a", [1], SamplingParams(), next(_ARRIVALS)))  # the id is taken until it returns
    assert run(s, out) == []
    assert "a" not in s and s.block_manager.num_used_blocks == 0 and not s.in_flight
