"""Runs one scheduled iteration on the rewritten graph: builds the ragged batch, calls the graph
against the paged KV cache it owns, samples. It reads the scheduler's output and never touches
``Request`` objects."""
from __future__ import annotations

import dataclasses
import time

import torch

from orca_compile.compiler import CompiledModel
from orca_compile.passes import lower_cpu
from orca_compile.runtime.batch import RaggedBatch
from orca_compile.runtime.sampler import Sampler
from orca_compile.runtime.scheduler import SchedulerOutput


@dataclasses.dataclass
class RunnerOutput:
    sampled_token_ids: list[int]  # one per request whose SchedulerOutput.sample is True, in order
    logprobs: list[float] | None
    prepare_seconds: float = 0.0  # building the ragged batch tensors
    forward_seconds: float = 0.0  # the graph itself
    sample_seconds: float = 0.0


_LOWERED = {"cpu": "orca", "onednn": "onednn"}  # backend -> lower_cpu's kernel


def resolve_backend(backend: str, compiled: CompiledModel) -> str:
    """``auto`` -> ``cpu`` where the C kernels apply (float32/float64 weights on the CPU, a C
    compiler), else ``onednn`` where it applies (float32 on the CPU, oneDNN built in), else
    ``eager``. An explicit ``cpu`` or ``onednn`` that cannot apply is a ``ValueError``."""
    if backend == "auto":
        return next((b for b, k in _LOWERED.items() if lower_cpu.applies(compiled.graph_module, k)), "eager")
    why = lower_cpu.unmet(compiled.graph_module, _LOWERED[backend]) if backend in _LOWERED else None
    if why:
        raise ValueError(f"backend={backend!r} cannot apply: {why}")
    return backend


class ModelRunner:
    def __init__(self, compiled: CompiledModel, num_kv_blocks: int, block_size: int, backend: str = "auto",
                 seed: int = 0, owns_compiled: bool = False):
        self.compiled = compiled
        self.block_size = block_size
        self.device = compiled.device
        self.kv_cache = compiled.new_kv_cache(num_kv_blocks, block_size)
        self.sampler = Sampler(self.device, seed=seed)
        self.backend = resolve_backend(backend, compiled)
        self.forward = compiled.graph_module
        if self.backend in _LOWERED:
            self.forward = lower_cpu.lower_cpu(compiled.graph_module, kernel=_LOWERED[self.backend])
            if owns_compiled:  # nobody else runs the unlowered graph: one copy of each weight, the packed one
                compiled.adopt(self.forward)
        elif self.backend == "inductor":
            # dynamic=True: T, R and the block-table width change every iteration; one graph
            # for all of them instead of a recompile per shape.
            self.forward = torch.compile(compiled.graph_module, dynamic=True)

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        # Preempted requests keep their generators: a recompute must not replay their draws.
        self.sampler.forget(out.finished_request_ids)
        t0 = time.perf_counter()
        batch = RaggedBatch.build(out.new_token_ids, out.num_computed_tokens, out.block_tables, self.block_size,
                                  sample=out.sample, device=self.device)
        t1 = time.perf_counter()
        with torch.no_grad():
            logits = self.forward(*self.compiled.inputs(batch, self.kv_cache))
        t2 = time.perf_counter()
        rows = [i for i, s in enumerate(out.sample) if s]
        if rows:
            tokens, logprobs = self.sampler.sample(logits, [out.request_ids[i] for i in rows],
                                                   [out.sampling_params[i] for i in rows])
        else:
            tokens, logprobs = [], None
        t3 = time.perf_counter()
        return RunnerOutput(tokens, logprobs, t1 - t0, t2 - t1, t3 - t2)
