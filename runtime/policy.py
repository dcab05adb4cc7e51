"""Scheduling policies: the choices of iteration-level scheduling, apart from its mechanism.

The scheduler (``scheduler.py``) owns the mechanism: the token budget, the KV blocks, admitting,
preempting and the ``SchedulerOutput``. A policy owns the choices, asked at each iteration:

* ``key(req)``: the order of service. Running requests are served in this order (decodes
  before prefill chunks, so that nobody's next token waits behind a long prompt), waiting
  requests are admitted in it;
* ``strict_admission``: True stops admitting at the first waiting request that does not fit (no
  short request overtakes a long one); False goes on down the queue;
* ``victim(running)``: which running request gives its blocks back when the cache runs out;
* ``preemption``: how a victim is preempted. ``recompute`` (free its blocks; its prompt and
  output are fed again later) is the mechanism there is; ``swap`` comes with the host pool.

Policies are registered by name (``register_policy``) and chosen by ``EngineConfig.policy``.
``fcfs`` is Orca's: arrival order, strict admission, the latest arrival preempted.
"""
from __future__ import annotations

import abc
from typing import Any

from orca_compile.runtime.registry import Registry
from orca_compile.runtime.request import Request

PREEMPTION_MODES = ("recompute",)


class SchedulingPolicy(abc.ABC):
    name = ""
    strict_admission = True
    preemption = "recompute"

    @abc.abstractmethod
    def key(self, req: Request) -> Any:
        """Sort key of the order of service: the smallest is served first."""

    def victim(self, running: list[Request]) -> Request:
        """The running request to preempt (``running`` is in service order): by default the last."""
        return running[-1]


class FCFS(SchedulingPolicy):
    """Orca's first-come-first-served (Algorithm 1): arrival order throughout."""

    name = "fcfs"

    def key(self, req: Request) -> int:
        return req.arrival


def _check_preemption(name: str, cls: type) -> None:
    if cls.preemption not in PREEMPTION_MODES:
        raise ValueError(f"policy {name!r} preempts by {cls.preemption!r}; one of {', '.join(PREEMPTION_MODES)}")


POLICIES = Registry("policy", SchedulingPolicy, _check_preemption)
register_policy = POLICIES.register  # register_policy(name, cls), or @register_policy(name)
unregister_policy = POLICIES.unregister


def make_policy(name: str) -> SchedulingPolicy:
    return POLICIES.make(name)


register_policy("fcfs", FCFS)
