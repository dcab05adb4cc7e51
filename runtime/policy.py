"""Scheduling policies: the choices of iteration-level scheduling, apart from its mechanism.

The scheduler (``scheduler.py``) owns the mechanism: the token budget, the KV blocks, admitting,
preempting and the ``SchedulerOutput``. A policy owns the choices, asked at each iteration:

* ``key(req)``: the order of service. Running requests are served in this order (decodes
  before prefill chunks, so that nobody's next token waits behind a long prompt), waiting
  requests are admitted in it;
* ``strict_admission``: True stops admitting at the first waiting request that does not fit (no
  short request overtakes a long one); False goes on down the queue;
* ``victim(running)``: which running request gives its blocks back when the cache runs out (how it
  gives them back, by recompute or by swap to the host pool, is the engine's mechanism, chosen by
  ``EngineConfig.preemption_mode``, not the policy's);
* ``decodes_first``: True serves running decodes before prefill chunks and admits waiting
  requests after both (Orca's Algorithm 1 with Sarathi's chunks); False serves every request,
  running or waiting, strictly in key order, so a better-placed newcomer runs before a resident
  (the budget holds back a token for each decode among the iteration's members, so prefill
  chunks never crowd those out: ``Scheduler._by_key``);
* ``displaces``: a waiting request may preempt a resident with a larger key to get a slot or KV
  blocks (only with ``decodes_first=False``);
* ``max_resident(config)``: how many requests hold KV blocks at once (``max_num_seqs`` bounds the
  requests *run* per iteration either way); more than ``max_num_seqs`` lets a policy pause a
  request at token granularity while it keeps its cache (FastServe);
* ``forms_batches``: request-level batching, admitting only when nothing runs;
* hooks: ``added(req)``, ``served(chosen, unfinished)`` after each decision (``chosen``: request
  id -> tokens it runs), ``removed(request_id)``.

Policies are registered by name (``register_policy``) and chosen by ``EngineConfig.policy``, with
``EngineConfig.policy_options`` as keyword arguments.

* ``fcfs`` is Orca's: arrival order, strict admission, the latest arrival preempted.
* ``priority``: ``add_request(..., priority=)`` (lower first, as vLLM), ties by arrival; a waiting
  request displaces the lowest-priority resident when slots or blocks run out.
* ``static``: request-level batching, the baseline of Orca's paper: a batch is admitted together
  and runs until every member has finished; then the next.
* ``mlfq``: FastServe's skip-join multi-level feedback queue (below).
"""
from __future__ import annotations

import abc
import itertools
from typing import Any, Iterable

from orca_compile.runtime.registry import Registry
from orca_compile.runtime.request import Request

class SchedulingPolicy(abc.ABC):
    name = ""
    strict_admission = True
    decodes_first = True
    displaces = False
    forms_batches = False

    @abc.abstractmethod
    def key(self, req: Request) -> Any:
        """Sort key of the order of service: the smallest is served first."""

    def victim(self, running: list[Request]) -> Request:
        """The running request to preempt (``running`` is in service order): by default the last."""
        return running[-1]

    def max_resident(self, config) -> int:
        return config.max_num_seqs

    def added(self, req: Request) -> None:
        pass

    def served(self, chosen: dict[str, int], unfinished: Iterable[Request]) -> None:
        pass

    def removed(self, request_id: str) -> None:
        pass


class FCFS(SchedulingPolicy):
    """Orca's first-come-first-served (Algorithm 1): arrival order throughout."""

    name = "fcfs"

    def key(self, req: Request) -> int:
        return req.arrival


class Priority(SchedulingPolicy):
    """Lower ``priority`` first (vLLM's convention), ties by arrival; a waiting request takes a
    slot or blocks from the lowest-priority resident (preempted by recompute)."""

    name = "priority"
    decodes_first = False
    displaces = True

    def key(self, req: Request) -> tuple[int, int]:
        return req.priority, req.arrival


class Static(SchedulingPolicy):
    """Request-level batching (Orca's baseline, as FasterTransformer serves): admit a batch when
    nothing runs, run it until every member has finished, then form the next. A member's output
    returns when it finishes; nothing joins a running batch."""

    name = "static"
    forms_batches = True

    def key(self, req: Request) -> int:
        return req.arrival


class MLFQ(SchedulingPolicy):
    """FastServe's skip-join multi-level feedback queue (Wu et al., 2023), on tokens of work.

    Queue ``i`` (0 is served first) has the quantum ``quantum * 2**i`` tokens; the last has none.
    *Skip-join*: a new request enters the first queue whose quantum covers its prompt (its first
    iteration's work), so a long prompt does not hold the short jobs' queue. A request that has
    run its queue's quantum (prompt chunks and decode tokens count, one a token) drops one queue.
    Each iteration serves requests in (queue, when they entered it) order, first in first out
    within a queue, up to ``max_num_seqs``; residents
    beyond them pause with their KV cache kept (up to ``resident_factor * max_num_seqs`` resident;
    a newcomer with a better queue displaces the worst resident when there is no room, which is
    then preempted by recompute). *Starvation bound*: a request not served for
    ``starvation_iterations`` iterations in a row goes back to queue 0 (its quantum used there
    restarts) behind the jobs already there; queue 0 is first in, first out, and each job leaves
    it after one quantum, so every request runs again within a bounded number of iterations.
    Preempted requests keep their queue and their generated tokens."""

    name = "mlfq"
    decodes_first = False
    displaces = True

    def __init__(self, quantum: int = 16, num_queues: int = 6, starvation_iterations: int = 200,
                 resident_factor: int = 2):
        for name, value in (("quantum", quantum), ("num_queues", num_queues),
                            ("starvation_iterations", starvation_iterations), ("resident_factor", resident_factor)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"mlfq: {name} must be an integer >= 1, got {value!r}")
        self.quantum, self.num_queues = quantum, num_queues
        self.starvation_iterations, self.resident_factor = starvation_iterations, resident_factor
        self.level: dict[str, int] = {}
        self.entered: dict[str, int] = {}  # when it entered its queue: the order within a queue
        self.used: dict[str, int] = {}  # tokens run in the current queue
        self.waited: dict[str, int] = {}  # iterations in a row not served
        self.promotions = 0
        self._clock = itertools.count()

    def quantum_of(self, level: int) -> float:
        return float("inf") if level >= self.num_queues - 1 else self.quantum * 2 ** level

    def key(self, req: Request) -> tuple[int, int]:
        """(queue, when it entered the queue): a promoted job queues behind those already there,
        so promotions cannot keep overtaking a queue's own jobs."""
        rid = req.request_id
        return self.level.get(rid, 0), self.entered.get(rid, req.arrival)

    def _move(self, rid: str, level: int) -> None:
        self.level[rid], self.entered[rid], self.used[rid], self.waited[rid] = level, next(self._clock), 0, 0

    def max_resident(self, config) -> int:
        return self.resident_factor * config.max_num_seqs

    def added(self, req: Request) -> None:
        level = 0
        while req.num_prompt_tokens > self.quantum_of(level):
            level += 1
        self._move(req.request_id, level)

    def served(self, chosen: dict[str, int], unfinished: Iterable[Request]) -> None:
        for req in unfinished:
            rid = req.request_id
            if rid in chosen:
                self.waited[rid] = 0
                self.used[rid] += chosen[rid]
                if self.used[rid] >= self.quantum_of(self.level[rid]):
                    self._move(rid, self.level[rid] + 1)
            else:
                self.waited[rid] += 1
                if self.waited[rid] >= self.starvation_iterations and self.level[rid] > 0:  # to queue 0's end
                    self._move(rid, 0)
                    self.promotions += 1

    def removed(self, request_id: str) -> None:
        for table in (self.level, self.entered, self.used, self.waited):
            table.pop(request_id, None)


POLICIES = Registry("policy", SchedulingPolicy)
register_policy = POLICIES.register  # register_policy(name, cls), or @register_policy(name)
unregister_policy = POLICIES.unregister


def make_policy(name: str, options: dict | None = None) -> SchedulingPolicy:
    try:
        return POLICIES.make(name, **(options or {}))
    except TypeError as exc:  # an option the policy does not take
        raise ValueError(f"policy {name!r}: {exc}") from None


register_policy("fcfs", FCFS)
register_policy("priority", Priority)
register_policy("static", Static)
register_policy("mlfq", MLFQ)
