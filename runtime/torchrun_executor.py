"""``executor="torchrun"``: tensor-parallel ranks launched by ``torchrun``, across machines.

``torchrun`` starts one process per rank on every machine (``--nnodes``, ``--node-rank``,
``--master-addr``); each joins the default process group from the environment it sets. Rank 0
runs the engine with this executor: it builds its own shard, and sends every decision to the
other ranks with a broadcast of the (small, picklable) message before it runs the iteration
itself; the other ranks run ``follow()``: build their shard, then do what each broadcast says,
until rank 0 broadcasts the end. Activations meet only in the graphs' all-reduces, as with the
one-machine ``multiproc`` executor. ``orca-compile generate`` under ``torchrun`` does both sides
(README: the multi-node command).

Failure: a collective that waits on a rank that is gone fails after ``collective_timeout``
seconds (the process group's timeout), on every rank that waits; rank 0's engine then raises.
"""
from __future__ import annotations

import datetime
import logging

import torch.distributed as dist

from orca_compile.runtime.executor import Executor, ModelInfo, join_process_group, register_executor
from orca_compile.runtime.host import tune_malloc
from orca_compile.runtime.model_runner import ModelRunner, RunnerOutput
from orca_compile.runtime.scheduler import SchedulerOutput

DEFAULT_COLLECTIVE_TIMEOUT = 30.0
log = logging.getLogger(__name__)


def _join(source, collective_timeout: float) -> int:
    """Join the launch's process group (from torchrun's environment); returns this rank."""
    if getattr(source, "pipeline_parallel_size", 1) > 1:
        raise ValueError("under torchrun the ranks run tensor parallel only for now; run pipeline stages with the "
                         "multiproc executor (--pp on one machine)")
    if not dist.is_initialized():
        backend = "nccl" if source.device_type == "cuda" else "gloo"
        if source.device_type == "cuda":  # one GPU per local rank
            import torch

            from orca_compile import env  # noqa: F401  (the launch's ranks were read there)

            torch.cuda.set_device(env.get().launch_local_rank)
        join_process_group(backend, init_method="env://", timeout=datetime.timedelta(seconds=collective_timeout))
    world = dist.get_world_size()
    if world != source.tensor_parallel_size:
        raise ValueError(f"torchrun started {world} ranks; tensor_parallel_size is {source.tensor_parallel_size}")
    return dist.get_rank()


def _runner(source, rank, seed) -> ModelRunner:
    if source.device_type == "cpu":
        tune_malloc()
    runner = ModelRunner(source.for_rank(rank).build(), seed=seed)
    log.info("torchrun rank %d of %d: built its shard (%d attention layers, %d KV heads each)", rank,
             dist.get_world_size(), len(runner.model.layers), runner.model.layers[0].num_kv_heads)
    return runner


class TorchrunExecutor(Executor):
    """Rank 0 of a torchrun launch; see the module docstring."""

    def __init__(self, source, seed: int = 0, collective_timeout: float = DEFAULT_COLLECTIVE_TIMEOUT):
        rank = _join(source, collective_timeout)
        if rank != 0:
            raise ValueError(f"the torchrun executor runs on rank 0; rank {rank} follows it (torchrun_executor.follow)")
        self.runner: ModelRunner | None = _runner(source, 0, seed)
        self.info = ModelInfo.of(self.runner.model)

    def _broadcast(self, msg) -> None:
        dist.broadcast_object_list([msg], src=0)

    def init_kv_cache(self, num_blocks: int, block_size: int, num_host_blocks: int = 0) -> None:
        self._broadcast(("init_kv_cache", num_blocks, block_size, num_host_blocks))
        self.runner.init_kv_cache(num_blocks, block_size, num_host_blocks)

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        self._broadcast(("execute", out))
        return self.runner.execute(out)

    def release(self, request_ids: list[str]) -> None:
        self._broadcast(("release", list(request_ids)))
        self.runner.sampler.forget(request_ids)

    def shutdown(self) -> None:
        if self.runner is None:
            return
        self.runner = None
        if dist.is_initialized():
            try:
                self._broadcast(None)
            finally:
                dist.destroy_process_group()


def follow(source, seed: int = 0, collective_timeout: float = DEFAULT_COLLECTIVE_TIMEOUT) -> None:
    """A rank other than 0 of a torchrun launch: build this rank's shard, then do what rank 0's
    broadcasts say until it broadcasts the end."""
    rank = _join(source, collective_timeout)
    try:
        runner = _runner(source, rank, seed)
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0)
            msg = box[0]
            if msg is None:
                break
            kind = msg[0]
            if kind == "execute":
                runner.execute(msg[1])
            elif kind == "release":
                runner.sampler.forget(msg[1])
            elif kind == "init_kv_cache":
                runner.init_kv_cache(*msg[1:])
    finally:
        dist.destroy_process_group()


register_executor("torchrun", TorchrunExecutor)
