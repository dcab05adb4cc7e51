"""Engine configuration: one validated dataclass. Its defaults are the project's defaults:
``optimize()``, the CLI and the benchmarks read them from here (``orca_compile.config.DEFAULTS``)."""
from __future__ import annotations

import dataclasses

KV_MODES = ("paged", "reserve")
PREEMPTION_MODES = ("recompute", "swap")


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


@dataclasses.dataclass
class EngineConfig:
    num_kv_blocks: int | None = None  # blocks in the paged cache; None: the engine sizes it from memory
    max_num_seqs: int = 64  # most requests admitted (holding KV blocks) at once: Orca's max batch size
    max_num_batched_tokens: int = 512  # token budget of one iteration (decodes + prefill chunks)
    block_size: int = 16  # tokens per KV cache block
    policy: str = "fcfs"  # a registered scheduling policy (runtime/policy.py)
    policy_options: dict = dataclasses.field(default_factory=dict)  # its keyword arguments (mlfq's quantum...)
    # "paged": blocks on demand, preempt (recompute) the policy's victim when they run out.
    # "reserve": Orca's scheme, reserve prompt + max_tokens slots at admission, never preempt.
    kv_mode: str = "paged"
    # how a preempted request gives its blocks back: "recompute" (freed; its tokens fed again
    # later) or "swap" (copied to a host-memory pool and back before it runs again; a full pool
    # falls back to recompute)
    preemption_mode: str = "recompute"
    num_host_kv_blocks: int | None = None  # the swap pool; None: as many as num_kv_blocks (swap only)
    chunked_prefill: bool = True  # split prompts across iterations under the token budget (Sarathi)
    max_model_len: int | None = None  # longest prompt + output; None: the model's own limit; 0: none
    executor: str = "local"  # a registered executor (runtime/executor.py)
    # iterations in flight at once (Orca's pipelining); None: what the executor holds (a pipeline:
    # its stage count; else 1); 1: one at a time
    max_in_flight: int | None = None

    def __post_init__(self):
        from orca_compile.runtime.executor import EXECUTORS
        from orca_compile.runtime.policy import POLICIES

        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            _positive_int(name, getattr(self, name))
        if self.num_kv_blocks is not None:
            _positive_int("num_kv_blocks", self.num_kv_blocks)
        if self.num_host_kv_blocks is not None:
            _positive_int("num_host_kv_blocks", self.num_host_kv_blocks)
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"unknown preemption_mode {self.preemption_mode!r}; one of {', '.join(PREEMPTION_MODES)}")
        if self.max_in_flight is not None:
            _positive_int("max_in_flight", self.max_in_flight)
        m = self.max_model_len
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 0):
            raise ValueError(f"max_model_len must be an integer >= 0 (0: no limit; None: the model's), got {m!r}")
        if not isinstance(self.chunked_prefill, bool):
            raise ValueError(f"chunked_prefill must be True or False, got {self.chunked_prefill!r}")
        if not isinstance(self.policy_options, dict):
            raise ValueError(f"policy_options must be a dict, got {self.policy_options!r}")
        for name, value, allowed in (("policy", self.policy, POLICIES), ("kv_mode", self.kv_mode, KV_MODES),
                                     ("executor", self.executor, EXECUTORS)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; one of {', '.join(allowed)}")
        from orca_compile.runtime.policy import make_policy

        make_policy(self.policy, self.policy_options)  # its options are checked now, not at the first step
