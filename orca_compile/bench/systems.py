"""The systems a benchmark times: the engine (on any backend) and HF's own serving, each set up once
and timed per call. Set-up (compiling, lowering, HF's cache allocation and warm-up) is excluded
from the timed part and reported apart."""
from __future__ import annotations

import dataclasses
import itertools
import statistics
import time

import torch

from orca_compile.config import DEFAULT_BACKEND, DEFAULTS
from orca_compile.host_probes import cpu_steal_seconds, since
from orca_compile.passes.graph_utils import fetch_attr
from orca_compile.presets import load_model, parse_dtype

SYSTEMS = ("engine", "engine-onednn", "engine-eager", "engine-inductor", "engine-tp2", "engine-pp2",
           "engine-pp2-serial", "engine-fp32", "hf-static", "hf-continuous", "hf-continuous-fp32")
# the engine with other options: another backend, two tensor-parallel ranks or two pipeline stages
# (a process each, one thread each on a 2-core machine, against the one-process engine's two
# threads); pp2 keeps an iteration in flight per stage (Orca's pipelining), pp2-serial one at a time
ENGINE_VARIANTS = {"engine-onednn": {"backend": "onednn"}, "engine-eager": {"backend": "eager"},
                   "engine-inductor": {"backend": "inductor"}, "engine-tp2": {"tensor_parallel_size": 2},
                   "engine-pp2": {"pipeline_parallel_size": 2},
                   "engine-pp2-serial": {"pipeline_parallel_size": 2, "max_in_flight": 1},
                   # a 16-bit checkpoint (W2) read in float32: float32 weights instead of 16-bit ones
                   "engine-fp32": {"dtype": "float32"}}
# HF on the workload's model in another dtype than the workload's (W2: the checkpoint read in float32)
HF_DTYPES = {"hf-continuous-fp32": "float32"}


def reads_the_model_itself(system: str, w, engine_kwargs: dict) -> bool:
    """Whether ``system`` loads workload ``w``'s model by name or path itself: a multi-process
    engine (its workers do: a worker never receives a model over a pipe), or the engine on a
    workload saved as a checkpoint (W2). ``engine_kwargs``: the run's engine options (``--tp``)."""
    options = dict(engine_kwargs) | ENGINE_VARIANTS.get(system, {})
    return (system == "engine" or system in ENGINE_VARIANTS) and (
        w.checkpoint_dtype is not None or options.get("tensor_parallel_size", 1) > 1
        or options.get("pipeline_parallel_size", 1) > 1)


def load_for(system: str, w, engine_kwargs: dict, device=None):
    """The model object ``system`` runs on for workload ``w`` (None: it reads the model itself),
    on ``device`` (None: the CPU)."""
    if reads_the_model_itself(system, w, engine_kwargs):
        return None
    return load_model(w.source(), dtype=HF_DTYPES.get(system, w.dtype), device=device)


@dataclasses.dataclass
class Result:
    system: str
    seconds: float
    useful_tokens: int
    setup_seconds: float = 0.0
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.useful_tokens / self.seconds


def run_engine(model, reqs, *, max_num_seqs=32, max_num_batched_tokens=DEFAULTS.max_num_batched_tokens,
               block_size=DEFAULTS.block_size, backend=DEFAULT_BACKEND, compiled=None) -> tuple[Result, list[list[int]]]:
    """Set the engine up (compile, lower, one untimed pass) and time one pass over ``reqs``."""
    return prepare_engine(model, reqs, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                          block_size=block_size, backend=backend, compiled=compiled)()


def prepare_engine(model, reqs, *, max_num_seqs=32, max_num_batched_tokens=DEFAULTS.max_num_batched_tokens,
                   block_size=DEFAULTS.block_size, backend=DEFAULT_BACKEND, compiled=None, tensor_parallel_size=1,
                   pipeline_parallel_size=1, max_in_flight=None, dtype=None, device=None):
    """The engine, set up once: compiled, lowered, and run over the whole workload untimed.
    Returns a function that times one more pass (a ``Result`` and the tokens); every call of it
    carries the same set-up seconds. ``model`` may be a name or path the engine loads (with
    ``dtype``, onto ``device``) itself; so it is with ``tensor_parallel_size`` or
    ``pipeline_parallel_size`` > 1."""
    import orca_compile
    from orca_compile import SamplingParams

    t0 = time.perf_counter()
    blocks = sum(-(-(len(p) + n) // block_size) for p, n in reqs) + 1
    sizes = dict(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, block_size=block_size,
                 num_kv_blocks=blocks, backend=backend)
    if not isinstance(model, torch.nn.Module) or tensor_parallel_size > 1 or pipeline_parallel_size > 1:
        engine = orca_compile.optimize(model, dtype=dtype, device=device,
                                       tensor_parallel_size=tensor_parallel_size,
                                       pipeline_parallel_size=pipeline_parallel_size, max_in_flight=max_in_flight,
                                       **sizes)
    else:
        # compiled for the backend asked for: a 16-bit CPU model widens only then (compiled for
        # eager first, its graph would hold the 16-bit casts and could lower to eager alone)
        compiled = compiled or orca_compile.compile(model, backend=backend, keep_stages=False)
        engine = orca_compile.optimize(compiled, **sizes)
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for _, n in reqs]
    prompts = [p for p, _ in reqs]
    # Warm-up: the whole workload once, untimed. Inductor compiles a new graph whenever a shape
    # breaks a guard of the ones it has (3 graphs on W1), and those compiles belong to set-up.
    engine.generate(prompts, params)
    setup = time.perf_counter() - t0
    runner = getattr(engine.executor, "runner", None)  # the in-process executor's: its graph is here
    weight_bytes = streamed_weight_bytes(runner.model.graph_module) if runner is not None else 0
    # what ran: the dtypes of the graph's weights (a 16-bit checkpoint's packed 16-bit and its
    # float32 norms; a run in another dtype's) and what the lowering did (its kernel, 16-bit path)
    ran = {} if runner is None else {
        "weight_dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in itertools.chain(
            runner.model.graph_module.parameters(), runner.model.graph_module.buffers()) if t.is_floating_point()}),
        "lowering": {k: v for k, v in runner.model.graph_module.meta.get("orca_lowering", {}).items()
                     if isinstance(v, (str, int, float))}}

    def timed() -> tuple[Result, list[list[int]]]:
        engine.iteration_stats.clear()
        steal = cpu_steal_seconds()
        start = time.perf_counter()
        outs = engine.generate(prompts, params)
        seconds = time.perf_counter() - start
        steal = since(steal)
        its = list(engine.iteration_stats)
        # decode-only iterations with every request in the batch: the smallest forward, so the
        # largest share of CPU overhead
        full = [it for it in its if len(it.request_ids) >= min(max_num_seqs, len(reqs)) and not it.num_prefill_tokens]
        extra = {
            "iterations": len(its),
            "forward_share": sum(it.forward_seconds for it in its) / sum(it.seconds for it in its),
            "full_batch_iterations": len(full),
            "cpu_steal_seconds": steal,
            "collective_seconds": sum(it.collective_seconds for it in its),  # all-reduces (rank 0's wait)
        }
        decodes = [it for it in its if not it.num_prefill_tokens]
        if decodes:  # every decode-only iteration, whatever its batch: what streams the weights most
            extra |= {"decode_iteration_ms": 1e3 * statistics.median(it.seconds for it in decodes),
                      "decode_iterations": len(decodes),
                      "decode_batch_median": statistics.median(len(it.request_ids) for it in decodes)}
        if weight_bytes:
            extra["streamed_weight_bytes"] = weight_bytes
        extra |= ran
        if full:
            extra |= {
                "full_batch_iteration_ms": 1e3 * statistics.median(it.seconds for it in full),
                "full_batch_overhead_ms": 1e3 * statistics.median(it.overhead_seconds for it in full),
                "full_batch_overhead_share": statistics.median(it.overhead_seconds / it.seconds for it in full),
                "overhead_breakdown_ms": {k: 1e3 * statistics.median(getattr(it, f"{k}_seconds") for it in full)
                                          for k in ("schedule", "prepare", "sample", "update")},
            }
        extra["iteration_log"] = [dict(requests=len(it.request_ids), prefill_tokens=it.num_prefill_tokens,
                                       decode_tokens=it.num_decode_tokens, forward_ms=round(1e3 * it.forward_seconds, 2),
                                       total_ms=round(1e3 * it.seconds, 2)) for it in its]
        tokens = [o.token_ids for o in outs]
        tp = f", tp={tensor_parallel_size}" if tensor_parallel_size > 1 else ""
        tp += f", pp={pipeline_parallel_size}, {engine.max_in_flight} in flight" if pipeline_parallel_size > 1 else ""
        return Result(f"orca-compile engine ({engine.backend}{tp})", seconds, sum(map(len, tokens)), setup,
                      extra), tokens

    timed.shutdown = engine.shutdown  # the harness releases the engine when the run ends
    return timed


def streamed_weight_bytes(gm: torch.fx.GraphModule) -> int:
    """Bytes of the weights an iteration reads whole: the weights of the lowered linear layers (C
    GEMM, oneDNN, experts) and every 1-D weight (norms, biases); not the tables an iteration
    gathers a few rows of (embeddings, rotary tables). A graph with no lowered linear layer
    (eager, inductor): every parameter and buffer but the embedding tables."""
    from orca_compile.kernels import gemm_cpu
    from orca_compile.ops import EXPERT_LINEAR
    from orca_compile.passes.lower_cpu import PACKED_LINEAR

    def attr(node):
        return fetch_attr(gm, node.target) if isinstance(node, torch.fx.Node) and node.op == "get_attr" else None

    streamed = {}
    for node in gm.graph.find_nodes(op="get_attr"):
        for user in node.users:
            if user.op == "call_function" and user.target in (gemm_cpu.linear, PACKED_LINEAR, EXPERT_LINEAR):
                t = attr(node)
                streamed[id(t)] = t
    if streamed:
        for t in itertools.chain(gm.parameters(), gm.buffers()):
            if t.dim() == 1:
                streamed[id(t)] = t
        return sum(t.numel() * t.element_size() for t in streamed.values())
    tables = {id(attr(n.args[0])) for n in gm.graph.find_nodes(
        op="call_function", target=torch.ops.aten.embedding.default)}
    seen = {id(t): t for t in itertools.chain(gm.parameters(), gm.buffers()) if id(t) not in tables}
    return sum(t.numel() * t.element_size() for t in seen.values())


def run_hf_static(model, reqs, batch_size=8) -> tuple[Result, list[list[int]]]:
    """HF ``generate`` on padded batches of ``batch_size`` in arrival order, each run to the
    longest output of its batch (the static batching Orca improves on)."""
    pad = 0
    steal = cpu_steal_seconds()
    tokens, start = [], time.perf_counter()
    computed = 0
    for i in range(0, len(reqs), batch_size):
        batch = reqs[i:i + batch_size]
        longest = max(len(p) for p, _ in batch)
        ids = torch.full((len(batch), longest), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (p, _) in enumerate(batch):  # left padding: every row's last prompt token lines up
            ids[r, longest - len(p):] = torch.tensor(p)
            mask[r, longest - len(p):] = 1
        steps = max(n for _, n in batch)
        with torch.no_grad():
            out = model.generate(ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=steps,
                                 do_sample=False, eos_token_id=None, pad_token_id=pad)
        computed += len(batch) * steps
        tokens += [out[r, longest:longest + n].tolist() for r, (_, n) in enumerate(batch)]
    seconds = time.perf_counter() - start
    useful = sum(n for _, n in reqs)
    return Result(f"HF generate, static batches of {batch_size}", seconds, useful,
                  extra={"generated_incl_padding_waste": computed, "cpu_steal_seconds": since(steal)}), tokens


def run_hf_continuous(model, reqs) -> tuple[Result, list[list[int]]]:
    """HF's own continuous batching (``init_continuous_batching``), per-request ``max_new_tokens``."""
    from transformers import GenerationConfig

    gen = GenerationConfig(do_sample=False, max_new_tokens=max(n for _, n in reqs), eos_token_id=-1, pad_token_id=0)
    t0 = time.perf_counter()
    results = {}
    import inspect

    # warm-up is an argument of the newer transformers (5.2x); a GPU image may carry an older one
    # (the GPU check's: 5.17), whose manager has no such argument
    warm = {"warmup": True} if "warmup" in inspect.signature(model.continuous_batching_context_manager).parameters \
        else {}
    with model.continuous_batching_context_manager(generation_config=gen, **warm) as manager:
        setup = time.perf_counter() - t0
        steal = cpu_steal_seconds()
        start = time.perf_counter()
        for i, (p, n) in enumerate(reqs):
            manager.add_request(p, request_id=f"r{i}", max_new_tokens=n, eos_token_id=-1)
        while len(results) < len(reqs):
            r = manager.get_result(timeout=60)
            if r is None:
                if not manager.is_running():
                    raise RuntimeError("HF continuous batching stopped before finishing the workload")
                continue
            if r.is_finished():
                results[r.request_id] = r
        seconds = time.perf_counter() - start
        steal = since(steal)
    tokens = [list(results[f"r{i}"].generated_tokens) for i in range(len(reqs))]
    return Result("HF continuous batching", seconds, sum(map(len, tokens)), setup,
                  {"cpu_steal_seconds": steal}), tokens


def prepare(system: str, model, reqs, engine_kwargs: dict, *, workload, compiled=None, device=None):
    """``system`` set up on ``model``: a function that times one pass (a ``Result`` and the tokens).
    ``device``: where a system that loads a model itself puts it (None: the CPU)."""
    if system == "engine" or system in ENGINE_VARIANTS:
        kwargs = dict(engine_kwargs) | ENGINE_VARIANTS.get(system, {})
        if reads_the_model_itself(system, workload, engine_kwargs):
            kwargs.setdefault("dtype", workload.dtype)
            return prepare_engine(workload.source(), reqs, device=device, **kwargs)
        return prepare_engine(model, reqs, compiled=compiled if "dtype" not in kwargs else None, **kwargs)
    if system in HF_DTYPES and (model is None or model.dtype != parse_dtype(HF_DTYPES[system])):
        model = load_for(system, workload, engine_kwargs, device)  # not the workload's dtype: its own copy
    if system == "hf-static":
        return lambda: run_hf_static(model, reqs)
    return lambda: run_hf_continuous(model, reqs)
