"""Iteration-level scheduling (Orca, OSDI '22, Algorithm 1) with chunked prefill (Sarathi-Serve).

Every iteration the scheduler picks which requests run and how many tokens each feeds, under two
limits: ``max_num_seqs`` requests admitted at once (Orca's max batch size) and
``max_num_batched_tokens`` tokens per iteration. Requests join and leave between iterations.

The choices are the policy's (``policy.py``: order of service, strict admission or not, the
victim, how it is preempted); this module carries them out. Order within an iteration:

1. running requests that decode (one pending token), in the policy's order: nobody's next token
   waits behind a long prompt;
2. running requests part-way through their prompt (or through a recompute), in that order;
3. waiting requests in that order, while a slot, budget and KV blocks last. Under strict
   admission (``fcfs``) admission stops at the first request that does not fit: a short request
   never overtakes a long one.

That is ``decodes_first`` (fcfs, static). A policy without it (priority, mlfq) is served by
``_by_key``: residents and waiting requests together, strictly in its order, the first
``max_num_seqs`` that fit; a request short of a slot (``max_resident``) or of blocks preempts
residents with keys above its own (``displaces``) when that makes it fit, else the decision stops
there (nothing worse takes what it waits for); residents past the batch pause with their blocks.
A ``forms_batches`` policy (static) takes the next ``max_num_seqs`` requests as one batch when the
engine is empty and admits nothing else until it has drained.

KV modes. ``reserve`` is Orca's: a request is admitted only with blocks for
``prompt + max_tokens - 1`` slots, so nothing is ever preempted. ``paged`` allocates blocks as
tokens arrive; when they run out, the policy's victim (``fcfs``: the latest-arrived running request) is preempted by recompute:
its blocks are freed, its prompt and generated tokens go back to the queue in its order and are
fed again later (chunked like any prompt). Generated tokens are kept, so the output is the same.
No deadlock under ``fcfs``: ``add_request`` rejects a request that could not finish alone in the
whole cache, and the earliest running request is the last to be preempted, so it always progresses.

Iterations in flight (Orca's pipelining: with pipeline stages the engine keeps up to one
iteration per stage in flight, without micro-batches). A request scheduled in an iteration is
*in flight* until ``update`` brings that iteration's result back: it is not scheduled again, not
chosen as a victim (a stage may still be writing its K/V), and an abort meanwhile frees its
blocks only when the result returns (its id stays taken until then). Each iteration then takes
at most its share, ``ceil(min(requests, max_num_seqs) / depth)``, of the requests, so that the
iterations in flight split them instead of the first taking all.
"""
from __future__ import annotations

import bisect
import dataclasses

from orca_compile.runtime.block_manager import KVBlockManager
from orca_compile.runtime.config import EngineConfig
from orca_compile.runtime.policy import SchedulingPolicy, make_policy
from orca_compile.runtime.request import Request, RequestStatus, SamplingParams


@dataclasses.dataclass
class SchedulerOutput:
    """One iteration's decision; the only thing that crosses from the scheduler to the runner."""

    request_ids: list[str]  # scheduled requests in batch order: decodes, then prefill chunks
    new_token_ids: list[list[int]]  # the tokens each request feeds this iteration
    num_computed_tokens: list[int]  # tokens each request already has in the KV cache
    block_tables: list[list[int]]  # each request's blocks, covering computed + new tokens
    sample: list[bool]  # True where the chunk ends at the request's last token: sample its next one
    sampling_params: list[SamplingParams]  # each request's (the runner reads those that sample)
    preempted_request_ids: list[str]  # preempted (by recompute or swap) while making this decision
    finished_request_ids: list[str]  # left the engine since the last iteration: drop their state
    num_prefill_tokens: int = 0  # prompt tokens, prompt chunks, and recomputed tokens
    num_decode_tokens: int = 0  # requests feeding exactly their last generated token
    # (device block, host block) copies the runner makes before this iteration runs: swaps out
    # first (the device blocks may be handed on in this same decision), then swaps in
    swap_out: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    swap_in: list[tuple[int, int]] = dataclasses.field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_tokens

    @property
    def is_empty(self) -> bool:
        return not self.request_ids


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: KVBlockManager | None = None,
                 policy: SchedulingPolicy | None = None):
        self.config = config
        self.block_manager = block_manager or KVBlockManager(config.num_kv_blocks, config.block_size)
        self.policy = policy if policy is not None else make_policy(config.policy, config.policy_options)
        self._key = self.policy.key
        self.waiting: list[Request] = []  # in the policy's order
        self.running: list[Request] = []  # in the policy's order
        self.requests: dict[str, Request] = {}  # every unfinished request
        self.num_preemptions = 0
        self._finished_ids: list[str] = []
        self.in_flight: set[str] = set()  # scheduled in an iteration whose result is not back yet
        # swap: the host pool's blocks (ids only, like the device's; the runner holds the tensors)
        self.host_block_manager = (KVBlockManager(config.num_host_kv_blocks or self.block_manager.num_blocks,
                                                  config.block_size) if config.preemption_mode == "swap" else None)
        self.swapped: set[str] = set()  # preempted by swap: their K/V wait in the host pool
        self.num_swaps_out = self.num_swaps_in = self.num_recomputes = 0
        self._swap_out: list[tuple[int, int]] = []
        self._swap_in: list[tuple[int, int]] = []
        self._host_free_later: list[str] = []  # swapped in by this decision: host blocks freed after it
        self.pipeline_depth = 1  # iterations the engine keeps in flight (it sets this)
        self._free_later: set[str] = set()  # aborted while in flight: blocks freed when it returns

    # ---- requests in and out ---------------------------------------------------------------

    def add(self, req: Request) -> None:
        assert req.request_id not in self, f"request id {req.request_id!r} is taken"
        self.requests[req.request_id] = req
        self.policy.added(req)
        bisect.insort(self.waiting, req, key=self._key)

    def abort(self, request_id: str) -> Request | None:
        req = self.requests.get(request_id)
        if req is None:
            return None
        (self.running if req.status is RequestStatus.RUNNING else self.waiting).remove(req)
        req.status = RequestStatus.FINISHED_ABORT
        self._retire(req)
        return req

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.requests or request_id in self.in_flight

    def defer_finished(self, request_ids: list[str]) -> None:
        """Hand ``request_ids`` out again with the next decision (their state must not be dropped
        while an earlier iteration, still in flight, may recreate it)."""
        self._finished_ids[:0] = request_ids

    def abort_all(self) -> None:
        for request_id in list(self.requests):
            self.abort(request_id)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_kv_blocks_used(self) -> int:
        return self.block_manager.num_used_blocks

    def kv_blocks_for(self, num_tokens: int) -> int:
        """KV blocks that ``num_tokens`` tokens of one request take."""
        return self.block_manager.blocks_for(num_tokens)

    # ---- the decision ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        # A policy's keys may change between iterations; the lists stay sorted for fcfs, where
        # this is one linear pass each.
        self.running.sort(key=self._key)
        self.waiting.sort(key=self._key)
        budget = self.config.max_num_batched_tokens
        busy = self.in_flight
        ready = [r for r in self.running if r.request_id not in busy] if busy else self.running
        # with iterations in flight, each takes its share of the requests (Orca keeps as many
        # batches in flight as stages; one iteration holding every request would leave the other
        # stages idle)
        runnable = min(len(self.requests), self.config.max_num_seqs)  # the admitted and the admittable
        cap = -(-runnable // self.pipeline_depth) if self.pipeline_depth > 1 else runnable
        if self.policy.forms_batches and not self.running and not busy:
            self._form_batch()
            ready = self.running
        if self.policy.decodes_first:
            chosen, preempted = self._decodes_first(ready, budget, cap, busy)
        else:
            chosen, preempted = self._by_key(ready, budget, cap, busy)
        if chosen:  # a decision that runs; requests in flight are being served, not waiting
            self.policy.served({rid: n for rid, (_, n) in chosen.items()},
                               [r for r in self.requests.values() if r.request_id not in busy])

        for rid in self._host_free_later:
            self.host_block_manager.free(rid)
        self._host_free_later = []
        out = SchedulerOutput([], [], [], [], [], [], preempted, self._finished_ids)
        self._finished_ids = []
        if chosen:  # an empty decision is not run: its copies wait for the next one that is
            out.swap_out, out.swap_in, self._swap_out, self._swap_in = self._swap_out, self._swap_in, [], []
        for req, n in chosen.values():
            start = req.num_computed_tokens
            out.request_ids.append(req.request_id)
            out.new_token_ids.append(req.token_ids[start:start + n])
            out.num_computed_tokens.append(start)
            out.block_tables.append(list(self.block_manager.block_table(req.request_id)))  # a snapshot
            last = start + n == req.num_tokens
            out.sample.append(last)
            out.sampling_params.append(req.params)
            if last and n == 1 and start >= req.num_prompt_tokens:  # feeds a generated token
                out.num_decode_tokens += 1
            else:
                out.num_prefill_tokens += n
        busy.update(out.request_ids)
        return out

    def update(self, out: SchedulerOutput, sampled: list[int], logprobs: list[float] | None) -> list[tuple[Request, list[int]]]:
        """Apply one iteration's results; returns each request that got a token, with it.

        ``sampled`` (and ``logprobs``) hold one entry per request whose ``out.sample`` is True.
        """
        touched = []
        j = 0
        for rid, new, do_sample in zip(out.request_ids, out.new_token_ids, out.sample):
            self.in_flight.discard(rid)
            req = self.requests.get(rid)
            if req is None:  # aborted while in flight: its blocks are free to go now
                j += do_sample
                if rid in self._free_later:
                    self._free_later.discard(rid)
                    self.block_manager.free(rid)
                continue
            req.num_computed_tokens += len(new)
            if not do_sample:
                continue
            token = sampled[j]
            req.append_token(token, logprobs[j] if logprobs is not None and req.params.logprobs else None)
            j += 1
            if req.status.finished:
                self.running.remove(req)
                self._retire(req)
            touched.append((req, [token]))
        assert j == len(sampled), f"{len(sampled)} sampled tokens for {j} sampling requests"
        return touched

    def _decodes_first(self, ready, budget, cap, busy):
        """Orca's order: running decodes, running prefill chunks, then admissions (strict under fcfs)."""
        chosen: dict[str, tuple[Request, int]] = {}  # insertion order is batch order
        preempted: list[str] = []
        decodes = [r for r in ready if r.num_pending_tokens == 1]
        prefills = [r for r in ready if r.num_pending_tokens > 1]
        for req in decodes + prefills:
            if budget == 0 or len(chosen) >= cap:
                break
            if req.status is not RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(req.num_pending_tokens, budget)
            while not self.block_manager.allocate(req.request_id, req.num_computed_tokens + n):
                # never a request in flight: a stage may still write its K/V into its blocks
                victim = self.policy.victim([r for r in self.running if r.request_id not in busy])
                budget += chosen.pop(victim.request_id, (None, 0))[1]
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            if req.status is RequestStatus.RUNNING:
                chosen[req.request_id] = (req, n)
                budget -= n

        # Admitting while preempting would only thrash: the freed blocks go to the running ones.
        # Request-level batching admits only into an empty engine (a new batch).
        admitting = not preempted and not (self.policy.forms_batches and self.running)
        i = 0
        while admitting and i < len(self.waiting) and len(self.running) < self.config.max_num_seqs and budget > 0 \
                and len(chosen) < cap:
            req = self.waiting[i]
            n = min(req.num_pending_tokens, budget)
            need = req.max_kv_tokens if self.config.kv_mode == "reserve" else req.num_computed_tokens + n
            if (n < req.num_pending_tokens and not self.config.chunked_prefill) or \
                    not self.block_manager.allocate(req.request_id, need):
                if self.policy.strict_admission:
                    break
                i += 1
                continue
            self.waiting.pop(i)
            self._resume(req)
            chosen[req.request_id] = (req, n)
            budget -= n
        return chosen, preempted

    def _by_key(self, ready, budget, cap, busy):
        """Every request, resident or waiting, strictly in the policy's order: the first ``cap``
        that fit run; a request short of a slot or blocks takes them from residents with a larger
        key (``displaces``), which are preempted, but only when that makes it fit (nobody is undone
        for nothing). When it cannot fit even so (its blocks are held by better or in-flight
        requests), the decision stops there: no worse request takes the blocks it waits for, so
        the best request always progresses. Residents past the first ``cap`` pause with their
        blocks kept. Whatever has a larger key than the request at hand has not been chosen yet,
        so no chosen work is ever undone.

        Decodes keep their token, as under Orca's order: the token budget holds back one token for
        each decode among the first ``cap`` requests in the order (the iteration's members) that
        comes later in it, so a better request's prefill chunk is a few tokens shorter rather than
        crowding those decodes out of the iteration. A decode's token costs the iteration next to
        nothing (the weights stream for the batch anyway), while waiting for an iteration without
        a full prefill costs its request a whole one: without the reserve, MLFQ's short prompts
        filled every budget and its mean JCT was 1.5-4x FCFS's at 5-8 requests/s
        (docs/benchmarks.md)."""
        chosen: dict[str, tuple[Request, int]] = {}
        preempted: list[str] = []
        max_resident = self.policy.max_resident(self.config)
        key, blocks = self._key, self.block_manager
        order = sorted(ready + self.waiting, key=key)
        members = {id(r) for r in order[:cap] if r.status is RequestStatus.RUNNING and r.num_pending_tokens == 1}
        reserve = len(members)  # tokens held back for the members' decodes still to come
        held = False  # a request was held back for the decodes: no worse one but those decodes may run
        for req in order:
            if budget == 0 or len(chosen) >= cap:
                break
            decode = id(req) in members
            reserve -= decode
            if req.request_id in preempted or (held and not decode):  # preempted earlier in this loop
                continue
            admitting = req.status is RequestStatus.WAITING
            available = budget if decode else budget - reserve
            if available <= 0 or (admitting and available < req.num_pending_tokens
                                   and not self.config.chunked_prefill):
                # what is left is the decodes'; what they leave goes to this request next time
                # (a worse one taking it now could keep the reserve up for ever: it decodes next)
                held = held or req.num_pending_tokens <= budget or self.config.chunked_prefill
                continue
            n = min(req.num_pending_tokens, available)
            need = req.max_kv_tokens if admitting and self.config.kv_mode == "reserve" else req.num_computed_tokens + n
            worse = [r for r in self.running if r.request_id not in busy and r is not req and key(r) > key(req)]
            wants_slot = admitting and len(self.running) >= max_resident
            if wants_slot and not (self.policy.displaces and worse):
                continue
            missing = blocks.num_missing_blocks(req.request_id, need)
            if missing > blocks.num_free_blocks + sum(len(blocks.block_table(r.request_id)) for r in worse):
                break
            if wants_slot:
                self._evict(worse, preempted)
            while not blocks.allocate(req.request_id, need):
                self._evict(worse, preempted)
            if admitting:
                self.waiting.remove(req)
                self._resume(req)
            chosen[req.request_id] = (req, n)
            budget -= n
        return chosen, preempted

    def _form_batch(self) -> None:
        """Request-level batching: the next ``max_num_seqs`` waiting requests become the batch at
        once (their blocks come as their prompts run, under the token budget); nothing joins it."""
        for req in self.waiting[:self.config.max_num_seqs]:
            # blocks now only for what must be there: Orca's reservation, or a swapped request's K/V
            need = req.max_kv_tokens if self.config.kv_mode == "reserve" else req.num_computed_tokens
            if need and not self.block_manager.allocate(req.request_id, need):
                break
            self.waiting.remove(req)
            self._resume(req)

    def _evict(self, worse: list[Request], preempted: list[str]) -> None:
        victim = self.policy.victim(worse)
        worse.remove(victim)
        self._preempt(victim)
        preempted.append(victim.request_id)

    # ---- helpers -----------------------------------------------------------------------------

    def _preempt(self, req: Request) -> None:
        """Back to the queue: by swap (its computed K/V copied to the host pool, kept) where the
        engine swaps and the pool has room, else by recompute (freed, fed again later)."""
        self.running.remove(req)
        rid = req.request_id
        host = self.host_block_manager
        computed = self.block_manager.blocks_for(req.num_computed_tokens)
        if host is not None and computed and host.allocate(rid, req.num_computed_tokens):
            device = self.block_manager.block_table(rid)
            self._swap_out.extend(zip(device[:computed], host.block_table(rid)))
            self.swapped.add(rid)
            self.num_swaps_out += 1
        else:
            req.num_computed_tokens = 0
            self.num_recomputes += 1
        self.block_manager.free(rid)
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, req, key=self._key)

    def _resume(self, req: Request) -> None:
        """Admit ``req`` (its device blocks allocated): a swapped request's K/V come back first."""
        rid = req.request_id
        if rid in self.swapped:
            host = self.host_block_manager.block_table(rid)
            self._swap_in.extend(zip(host, self.block_manager.block_table(rid)))
            # its host blocks are freed once this decision is made, not now: the runner copies all
            # swaps out before all swaps in (device blocks freed by a swap-out may be the ones a
            # swap-in fills), so a host block must not be swapped into and out of in one decision
            self._host_free_later.append(rid)
            self.swapped.discard(rid)
            self.num_swaps_in += 1
        req.status = RequestStatus.RUNNING
        bisect.insort(self.running, req, key=self._key)

    def _retire(self, req: Request) -> None:
        if req.request_id in self.swapped:  # aborted while swapped out: its host blocks go too
            # and so does a copy out to them that has not run yet (a decision that was not run
            # handed it on): the blocks may go to the next victim, whose copy must be the only one
            mine = set(self.host_block_manager.block_table(req.request_id))
            self._swap_out = [(d, h) for d, h in self._swap_out if h not in mine]
            self.host_block_manager.free(req.request_id)
            self.swapped.discard(req.request_id)
        if req.request_id in self.in_flight:
            self._free_later.add(req.request_id)
        else:
            self.block_manager.free(req.request_id)
        del self.requests[req.request_id]
        self.policy.removed(req.request_id)
        self._finished_ids.append(req.request_id)

