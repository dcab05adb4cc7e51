"""Where the model runs, behind one interface, so that the engine does not change with the placement.

An executor is built from a *model source*: anything with a ``build()`` that returns a compiled
model (``orca_compile.compiler.ModelSpec`` is the one the face passes: a checkpoint path or an
in-memory model, the backend, later the partition plan and the rank). A worker in another
process receives the source, never a model, and builds its own part. The engine then:

1. reads ``executor.info`` (vocabulary, EOS ids, context limit, cache bytes per token) to size
   and validate;
2. calls ``init_kv_cache(num_blocks, block_size)`` once;
3. calls ``execute(scheduler_output)`` every iteration and ``release(request_ids)`` for requests
   that left without an iteration to say so; or, to keep several iterations in flight (up to
   ``max_in_flight``: a pipeline's stages), ``submit(scheduler_output)`` for each and
   ``collect()`` for the oldest one's result (the default pair runs ``execute`` at ``collect``);
4. calls ``shutdown()`` once at the end (``Engine.shutdown()`` or its context manager).

Implementations are registered by name (``register_executor``) and chosen by
``EngineConfig.executor``; ``local`` (one runner in this process) is the default.
"""
from __future__ import annotations

import abc
import dataclasses

import torch

from orca_compile.runtime.host import tune_malloc
from orca_compile.runtime.model_runner import ModelRunner, RunnerOutput
from orca_compile.runtime.registry import Registry
from orca_compile.runtime.scheduler import SchedulerOutput


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the engine needs to know of the model, whichever process holds it."""

    vocab_size: int
    eos_token_ids: tuple[int, ...]
    max_model_len: int  # 0: the model states no limit
    kv_cache_bytes_per_token: int  # every layer's K and V, on one device
    device: torch.device
    backend: str  # what the graph was lowered for

    @classmethod
    def of(cls, model) -> "ModelInfo":
        return cls(model.vocab_size, tuple(model.eos_token_ids), model.max_model_len,
                   model.kv_cache_bytes_per_token(), model.device, model.backend)

    @classmethod
    def of_pipeline(cls, infos: list["ModelInfo"]) -> "ModelInfo":
        """The stages' infos as one: the last stage's vocabulary, the largest cache per device."""
        last = infos[-1]
        return dataclasses.replace(last, kv_cache_bytes_per_token=max(i.kv_cache_bytes_per_token for i in infos))

    def kv_cache_bytes_per_block(self, block_size: int) -> int:
        return block_size * self.kv_cache_bytes_per_token


class Executor(abc.ABC):
    """Runs the scheduler's decisions on the model; see the module docstring for the protocol."""

    info: ModelInfo
    max_in_flight: int = 1  # iterations it can hold at once (a pipeline: one per stage)

    @abc.abstractmethod
    def __init__(self, source, seed: int = 0):
        """Build the model from ``source`` (``source.build()``) wherever this executor runs it."""

    @abc.abstractmethod
    def init_kv_cache(self, num_blocks: int, block_size: int, num_host_blocks: int = 0) -> None:
        """Allocate the paged cache: ``num_blocks`` blocks of ``block_size`` tokens, and a host pool
        of ``num_host_blocks`` blocks for preemption by swap (given only when the engine swaps)."""

    @abc.abstractmethod
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        """Run one iteration; returns the sampled tokens of the requests whose ``out.sample`` is set."""

    def submit(self, out: SchedulerOutput) -> None:
        """Start one iteration; its result comes from ``collect()``, in submission order."""
        self.__dict__.setdefault("_submitted", []).append(out)

    def collect(self) -> RunnerOutput:
        """The result of the oldest submitted iteration (waits for it)."""
        return self.execute(self.__dict__["_submitted"].pop(0))

    @abc.abstractmethod
    def release(self, request_ids: list[str]) -> None:
        """Drop per-request state (seeded generators) of requests that left the engine."""

    def shutdown(self) -> None:
        """Release what the executor holds (the model, the cache, processes it started). Idempotent."""


class LocalExecutor(Executor):
    """One ``ModelRunner`` in this process."""

    def __init__(self, source, seed: int = 0):
        if not callable(getattr(source, "build", None)):
            raise ValueError(f"an executor builds its model from a source with build() (orca_compile.ModelSpec), "
                             f"got {type(source).__name__}")
        if getattr(source, "device_type", "cpu") == "cpu":
            # the process that runs a CPU model tunes its allocator before it builds the model (the
            # lowering's packing then fills the heap that the activations reuse); see runtime/host.py
            tune_malloc()
        model = source.build()
        self.info = ModelInfo.of(model)
        self.runner: ModelRunner | None = ModelRunner(model, seed=seed)

    def init_kv_cache(self, num_blocks: int, block_size: int, num_host_blocks: int = 0) -> None:
        self.runner.init_kv_cache(num_blocks, block_size, num_host_blocks)

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        return self.runner.execute(out)

    def release(self, request_ids: list[str]) -> None:
        self.runner.sampler.forget(request_ids)

    def shutdown(self) -> None:
        self.runner = None  # the model, its weights and the cache go with it


EXECUTORS = Registry("executor", Executor)
register_executor = EXECUTORS.register  # register_executor(name, cls), or @register_executor(name)
unregister_executor = EXECUTORS.unregister


def make_executor(name: str, source, seed: int = 0) -> Executor:
    return EXECUTORS.make(name, source, seed=seed)


def join_process_group(backend: str, **kwargs) -> None:
    """``torch.distributed.init_process_group(backend, **kwargs)``, with ``torch._dynamo`` imported
    first. Importing ``torch._dynamo`` *after* the group exists (``torch.export`` does, when a rank
    builds its graph) keeps a reference to the group that ``destroy_process_group`` does not drop
    (torch 2.13); the gloo group's worker threads then outlive it, and when one of them frees its
    last collective's tensors while the interpreter is finalising, the process aborts ("terminate
    called without an active exception"; a core dump showed the thread in ``~AsyncBroadcastWork``
    waiting for the GIL). Imported first, nothing holds the group: ``destroy_process_group`` joins
    its threads (tests/runtime/test_process_group_exit.py)."""
    import torch._dynamo  # noqa: F401  (see above: before the group, not after)
    import torch.distributed as dist

    dist.init_process_group(backend, **kwargs)


register_executor("local", LocalExecutor)

from orca_compile.runtime import multiproc_executor, torchrun_executor  # noqa: E402,F401  (register theirs)
