"""Engine configuration: one validated dataclass, filled in by ``orca_compile.optimize``."""
from __future__ import annotations

import dataclasses

POLICIES = ("fcfs",)
KV_MODES = ("paged", "reserve")
BACKENDS = ("auto", "eager", "cpu", "onednn", "inductor")


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


@dataclasses.dataclass
class EngineConfig:
    num_kv_blocks: int  # blocks in the paged cache (optimize() sizes it when not given)
    max_num_seqs: int = 64  # most requests admitted (holding KV blocks) at once: Orca's max batch size
    max_num_batched_tokens: int = 512  # token budget of one iteration (decodes + prefill chunks)
    block_size: int = 16  # tokens per KV cache block
    policy: str = "fcfs"
    # "paged": blocks on demand, preempt (recompute) the latest arrival when they run out.
    # "reserve": Orca's scheme, reserve prompt + max_tokens slots at admission, never preempt.
    kv_mode: str = "paged"
    chunked_prefill: bool = True  # split prompts across iterations under the token budget (Sarathi)
    max_model_len: int = 0  # longest prompt + output; 0: no limit of the model's own
    # "eager": run the rewritten graph as it is. "cpu": lower its linear layers to this project's C
    # GEMM on weights packed once, activations fused, attention called directly (passes/lower_cpu.py;
    # CPU float32/float64, needs a C compiler). "onednn": the same lowering onto oneDNN (CPU float32).
    # "inductor": torch.compile the rewritten graph, dynamic in T. "auto": the first of cpu, onednn
    # that applies, else "eager".
    backend: str = "auto"

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "num_kv_blocks"):
            _positive_int(name, getattr(self, name))
        if isinstance(self.max_model_len, bool) or not isinstance(self.max_model_len, int) or self.max_model_len < 0:
            raise ValueError(f"max_model_len must be an integer >= 0 (0: no limit), got {self.max_model_len!r}")
        if not isinstance(self.chunked_prefill, bool):
            raise ValueError(f"chunked_prefill must be True or False, got {self.chunked_prefill!r}")
        for name, value, allowed in (("policy", self.policy, POLICIES), ("kv_mode", self.kv_mode, KV_MODES),
                                     ("backend", self.backend, BACKENDS)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; one of {', '.join(allowed)}")
