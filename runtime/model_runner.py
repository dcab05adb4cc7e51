"""Runs one scheduled iteration on a compiled model: builds the ragged batch, calls the graph
against the paged KV cache it owns, samples. It reads the scheduler's output and never touches
``Request`` objects; it never compiles or lowers (the compiler did, for the backend asked)."""
from __future__ import annotations

import dataclasses
import time

import torch

from orca_compile.ops import collective_time
from orca_compile.runtime.batch import RaggedBatch
from orca_compile.runtime.kv_cache import new_kv_cache
from orca_compile.runtime.sampler import Sampler
from orca_compile.runtime.scheduler import SchedulerOutput


@dataclasses.dataclass
class RunnerOutput:
    sampled_token_ids: list[int]  # one per request whose SchedulerOutput.sample is True, in order
    logprobs: list[float] | None
    prepare_seconds: float = 0.0  # building the ragged batch tensors
    forward_seconds: float = 0.0  # the graph itself
    sample_seconds: float = 0.0
    collective_seconds: float = 0.0  # of forward_seconds, in the all-reduces of a tensor-parallel graph


def graph_inputs(model, batch: RaggedBatch, kv_cache, hidden: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The positional inputs of ``model``'s graph (placeholder order, ``model.input_names``) for one
    iteration; ``hidden``: the residual stream a pipeline stage after the first takes."""
    if len(kv_cache) != len(model.layers):
        raise ValueError(f"kv_cache has {len(kv_cache)} layers; the model has {len(model.layers)}")
    feed = {
        "input_ids": batch.input_ids, "position_ids": batch.positions,
        "slot_mapping": batch.slot_mapping, "query_start_loc": batch.query_start_loc,
        "seq_lens": batch.seq_lens, "block_tables": batch.block_tables,
        "logits_indices": batch.logits_indices, "hidden": hidden,
    }
    for i, (k, v) in enumerate(kv_cache):
        feed[f"k_cache_{i}"], feed[f"v_cache_{i}"] = k, v
    return [feed[name] for name in model.input_names]


def run_graph(model, batch: RaggedBatch, kv_cache, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """One ragged iteration of a ``CompiledModel``: logits ``[len(batch.logits_indices), vocab]``
    (a pipeline stage before the last: its residual stream ``[T, hidden]``)."""
    with torch.no_grad():
        return model.forward(*graph_inputs(model, batch, kv_cache, hidden))


class ModelRunner:
    def __init__(self, model, seed: int = 0):
        """``model``: a ``CompiledModel`` (its graph lowered already for the backend it runs on)."""
        self.model = model
        self.device = model.device
        self.sampler = Sampler(self.device, seed=seed)
        self.kv_cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.host_kv_cache: list[tuple[torch.Tensor, torch.Tensor]] = []  # the swap pool
        self.block_size = 0
        if model.stage > 0:  # the residual stream this stage receives
            hidden = next(n for n in model.graph_module.graph.find_nodes(op="placeholder") if n.target == "hidden")
            self._hidden_in, self._hidden_dtype = int(hidden.meta["val"].shape[-1]), hidden.meta["val"].dtype

    @property
    def backend(self) -> str:
        return self.model.backend

    def init_kv_cache(self, num_blocks: int, block_size: int, num_host_blocks: int = 0) -> None:
        self.kv_cache = new_kv_cache(self.model, num_blocks, block_size)
        # the swap pool in host memory (pinned off the CPU, so the copies can overlap later)
        self.host_kv_cache = new_kv_cache(self.model, num_host_blocks, block_size, device="cpu") \
            if num_host_blocks else []
        if self.host_kv_cache and self.device.type == "cuda":
            self.host_kv_cache = [(k.pin_memory(), v.pin_memory()) for k, v in self.host_kv_cache]
        self.block_size = block_size

    def swap(self, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]]) -> None:
        """Copy whole blocks, every layer: device -> host for ``swap_out`` (device, host) pairs, then
        host -> device for ``swap_in`` (host, device) pairs."""
        if not (swap_out or swap_in):
            return
        if not self.host_kv_cache:
            raise RuntimeError("the scheduler swapped blocks, but this runner has no host pool "
                               "(init_kv_cache(..., num_host_blocks=) was not given one)")
        for pairs, to_host in ((swap_out, True), (swap_in, False)):
            if not pairs:
                continue
            src, dst = (torch.tensor(list(c), dtype=torch.long) for c in zip(*pairs))
            for (k, v), (hk, hv) in zip(self.kv_cache, self.host_kv_cache):
                for dev, host in ((k, hk), (v, hv)):
                    if to_host:
                        host.index_copy_(0, dst, dev.index_select(0, src.to(dev.device)).to("cpu"))
                    else:
                        dev.index_copy_(0, dst.to(dev.device), host.index_select(0, src).to(dev.device))

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        assert self.kv_cache, "init_kv_cache() first"
        # Preempted requests keep their generators: a recompute must not replay their draws.
        self.sampler.forget(out.finished_request_ids)
        t0 = time.perf_counter()
        self.swap(out.swap_out, out.swap_in)  # before the graph: the freed blocks may be written now
        batch = RaggedBatch.build(out.new_token_ids, out.num_computed_tokens, out.block_tables, self.block_size,
                                  sample=out.sample, device=self.device)
        c0, _ = collective_time()
        t1 = time.perf_counter()
        model = self.model
        if model.num_stages > 1:  # a pipeline stage: the residual stream from the one before, to the next
            import torch.distributed as dist

            # a stage's rank r talks to rank r of the stages around it (global rank: stage * tp + r)
            tp, r = model.tensor_parallel_size, model.tensor_parallel_rank
            hidden = None
            if model.stage > 0:
                hidden = torch.empty(batch.num_tokens, self._hidden_in, dtype=self._hidden_dtype, device=self.device)
                dist.recv(hidden, src=(model.stage - 1) * tp + r)
            out_tensor = run_graph(model, batch, self.kv_cache, hidden)
            if model.stage < model.num_stages - 1:
                dist.send(out_tensor.contiguous(), dst=(model.stage + 1) * tp + r)
                t2 = time.perf_counter()
                return RunnerOutput([], None, t1 - t0, t2 - t1, 0.0)
            logits = out_tensor
        else:
            logits = run_graph(model, batch, self.kv_cache)
        t2 = time.perf_counter()
        c1, _ = collective_time()
        rows = [i for i, s in enumerate(out.sample) if s]
        if rows:
            tokens, logprobs = self.sampler.sample(logits, [out.request_ids[i] for i in rows],
                                                   [out.sampling_params[i] for i in rows])
        else:
            tokens, logprobs = [], None
        t3 = time.perf_counter()
        return RunnerOutput(tokens, logprobs, t1 - t0, t2 - t1, t3 - t2, c1 - c0)
