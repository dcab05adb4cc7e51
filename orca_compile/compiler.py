"""``orca_compile.compile(model) -> CompiledModel``: the whole pipeline, frontend to backend.

capture (torch.export) -> selective batching (``flatten_tokens``, ``split_attention``,
``prune_logits``, ``cleanup``) -> lowering for the chosen backend, every step a pass under one
``PassManager``. The result is a value: the graph to run, the attention layers it holds, the
cache layout they need and the names of its inputs. Allocating the cache and building each
iteration's inputs is the runtime's job (``runtime/kv_cache.py``, ``runtime/model_runner.py``); this
module imports nothing of the runtime.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import os
import time

import torch
import torch.fx

from orca_compile import sixteen_bit
from orca_compile.capture import capture
from orca_compile.ops import ATTENTION
from orca_compile.passes import lower_cpu
from orca_compile.passes.graph_utils import fetch_attr
from orca_compile.passes.manager import DEFAULT_PIPELINE, PassManager
from orca_compile.passes.partition.pipeline_split import pipeline_stage
from orca_compile.passes.partition.tensor_parallel import tensor_parallel

log = logging.getLogger(__name__)

# "eager": the rewritten graph as it is. "cpu": its linear layers lowered to this project's C GEMM
# on weights packed once, activations fused, attention called directly (passes/lower_cpu.py; CPU
# float32/float64, needs a C compiler). "onednn": the same lowering onto oneDNN (CPU float32).
# "inductor": torch.compile of the rewritten graph, dynamic in T. "auto": the first of cpu, onednn
# that applies, else "eager".
BACKENDS = ("auto", "eager", "cpu", "onednn", "inductor")
_KERNEL = {"cpu": "orca", "onednn": "onednn"}  # backend -> lower_cpu's kernel


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """What the runtime needs to know of one attention layer (read off the graph)."""

    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    dtype: torch.dtype
    scale: float
    sliding_window: int
    softcap: float

    def cache_bytes_per_token(self) -> int:
        return self.num_kv_heads * (self.head_dim + self.v_head_dim) * self.dtype.itemsize


class CompiledModel:
    """The rewritten (and lowered) graph of one model: what a device runs, and what it needs.

    ``graph_module`` is the graph the engine runs (the ``lowered`` stage); ``forward`` the callable
    that runs it (the graph itself, or ``torch.compile`` of it for ``inductor``); ``stages`` maps
    each kept stage (``captured``, ``flattened``, ``split``, ``pruned``, ``final``, the lowering's,
    ``lowered``) to its graph; ``records`` holds each pass's time and op-count changes; ``layers``
    the attention layers in order, which fix the cache layout; ``input_names`` the graph's
    placeholders in order; ``backend`` the backend it was lowered for (``auto`` resolved).
    """

    def __init__(self, graph_module, stages, records, capture_seconds, config, model_class, backend="eager",
                 eos_token_ids: tuple[int, ...] = (), device: torch.device | None = None):
        self.graph_module = graph_module
        self.stages = stages
        self.records = records
        self.capture_seconds = capture_seconds
        self.config = config
        self.model_class = model_class
        self.backend = backend
        self.input_names = [n.target for n in graph_module.graph.find_nodes(op="placeholder")]
        self.layers = _attention_specs(graph_module)
        out = graph_module.graph.output_node().args[0].meta["val"]
        pipeline = graph_module.meta.get("orca_pipeline") or {}
        self.stage = int(pipeline.get("stage", 0))  # of a pipeline: this graph's stage, of num_stages
        self.num_stages = int(pipeline.get("num_stages", 1))
        partition = graph_module.meta.get("orca_partition") or {}
        self.tensor_parallel_size = int(partition.get("tensor_parallel_size", 1))  # within its stage
        self.tensor_parallel_rank = int(partition.get("rank", 0))
        # a stage before the last returns the residual stream [T, hidden], not logits
        self.vocab_size = int(out.shape[-1]) if self.stage == self.num_stages - 1 else 0
        self.hidden_size = 0 if self.stage == self.num_stages - 1 else int(out.shape[-1])
        self.device = device or out.device  # a graph captured on meta tensors: where its weights went
        self.eos_token_ids = tuple(eos_token_ids)  # what generate() stops at, read off the HF model
        self.max_model_len = int(getattr(config, "max_position_embeddings", 0) or 0)  # 0: no limit
        # dynamic=True: T, R and the block-table width change every iteration; one graph for all
        # of them instead of a recompile per shape
        self.forward = torch.compile(graph_module, dynamic=True) if backend == "inductor" else graph_module

    @property
    def pass_seconds(self) -> float:
        return sum(r.seconds for r in self.records)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def kv_cache_bytes_per_token(self) -> int:
        """Bytes of K and V that one token takes in every layer's cache."""
        return sum(spec.cache_bytes_per_token() for spec in self.layers)


def _attention_specs(gm: torch.fx.GraphModule) -> list[AttentionSpec]:
    from orca_compile.kernels import attention_cpu  # the lowered graph calls it where the op was

    specs = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (ATTENTION, attention_cpu.attention):
            continue
        q, k, v, k_cache, v_cache = node.args[:5]
        kc, vc = k_cache.meta["val"], v_cache.meta["val"]
        scale, window, softcap = node.args[9:12]
        specs.append(AttentionSpec(int(kc.shape[2]), int(kc.shape[3]), int(vc.shape[3]), kc.dtype, scale, window,
                                   softcap))
    return specs


def resolve_backend(backend: str, gm: torch.fx.GraphModule) -> str:
    """``auto`` -> ``cpu`` where the C kernels apply (float32/float64 weights on the CPU, a C
    compiler), else ``onednn`` where it applies (float32 on the CPU, oneDNN built in), else
    ``eager``; the choice and the reasons go to the log. An explicit ``cpu`` or ``onednn`` that
    cannot apply is a ``ValueError`` saying why."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; one of {', '.join(BACKENDS)}")
    if backend == "auto":
        reasons = {}
        for name, kernel in _KERNEL.items():
            why = lower_cpu.unmet(gm, kernel)
            if why is None:
                log.info("backend auto -> %s", name)
                return name
            reasons[name] = why
        on_cpu = all(t.device.type == "cpu" for t in gm.parameters())
        dtypes = {t.dtype for t in gm.parameters() if t.is_floating_point()}
        native = on_cpu and len(dtypes) == 1 and sixteen_bit.native_sixteen_bit_matmul(next(iter(dtypes)))
        (log.warning if on_cpu and not native else log.info)(
            "backend auto -> eager (the rewritten graph on ATen's kernels%s): %s",
            ", which use this CPU's 16-bit matrix units" if native else ", the slow path on a CPU" if on_cpu else "",
            "; ".join(f"{name} cannot apply: {why}" for name, why in reasons.items()))
        return "eager"
    why = lower_cpu.unmet(gm, _KERNEL[backend]) if backend in _KERNEL else None
    if why:
        raise ValueError(f"backend={backend!r} cannot apply: {why}")
    return backend


def lowering_pipeline(backend: str) -> list:
    """The passes that lower a ``final`` graph for ``backend`` (resolved): the last one's result is
    the ``lowered`` stage. ``eager`` and ``inductor`` run the graph as it is (an empty pipeline)."""
    return lower_cpu.pipeline(_KERNEL[backend]) if backend in _KERNEL else []


def compile(model: torch.nn.Module, *, backend: str = "eager", keep_stages: bool = True,
            max_tokens: int | None = None, tensor_parallel_size: int = 1, rank: int = 0,
            pipeline_parallel_size: int = 1, stage: int = 0, cuts=None, replicated=(),
            vocab_parallel_head: bool = False, materialize=None, weight_storage: torch.dtype | None = None,
            native_sixteen_bit: bool | None = None) -> CompiledModel:
    """Capture ``model`` (an HF causal LM), rewrite it into selective-batching form and lower it
    for ``backend``. The default, ``eager``, leaves the portable graph (what a person inspects,
    and any device runs); ``optimize()`` asks for ``auto``, the fastest backend that applies here.
    ``keep_stages=False`` keeps only the ``final`` and ``lowered`` graphs when they are one, else
    only ``lowered``: the unlowered originals of packed weights are then freed with the model.
    ``tensor_parallel_size`` > 1: rank ``rank``'s shard (``passes/partition/tensor_parallel.py``,
    the ``partitioned`` stage, between ``final`` and the lowering), whose graph sums its partial
    results with the other ranks' through ``orca::all_reduce``. ``pipeline_parallel_size`` > 1:
    stage ``stage``'s layers only (``passes/partition/pipeline_split.py``), whose graph takes the
    previous stage's residual stream as ``hidden`` and returns its own (the last: the logits).
    ``cuts``, ``replicated`` and ``vocab_parallel_head``: a plan's choices (the planner's, or
    yours): the first layer of each stage then the layer count, the blocks ``(kind, layer)`` kept
    whole on every rank, and the LM head sharded by vocabulary. ``materialize``: a function that
    fills the partitioned graph's meta tensors in place (a model built on meta tensors: the rank
    reads only its shard, ``orca_compile/materialize.py``), run before the lowering.

    16-bit weights on the CPU (``backend`` ``auto``, ``cpu`` or ``onednn``; every floating
    parameter bfloat16, or every one float16): the graph is captured from a float32 copy of the
    model (``weight_storage``: the 16-bit dtype, which a caller that loaded the checkpoint in
    float32 itself passes), and its linears either multiply in the 16-bit dtype on oneDNN's packed
    weights or in float32 on the C GEMM's 16-bit weights (``native_sixteen_bit``; None: the former
    where the CPU has 16-bit matrix units): ``orca_compile/sixteen_bit.py``. ``eager`` and
    ``inductor`` run the model in its own dtype instead."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; one of {', '.join(BACKENDS)}")
    if weight_storage not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"weight_storage must be None, torch.bfloat16 or torch.float16, got {weight_storage!r}")
    sixteen_bit.check_native(native_sixteen_bit)
    if weight_storage is None and sixteen_bit.widens(backend):
        weight_storage = sixteen_bit.cpu_weights(model)
        if weight_storage is not None:
            model = copy.deepcopy(model).float()  # the caller's model stays as it is
    matmul_dtype = sixteen_bit.matmul_dtype(weight_storage, native_sixteen_bit) if backend in sixteen_bit.WIDENS else None
    if native_sixteen_bit is not None and (weight_storage is None or backend not in sixteen_bit.WIDENS):
        log.warning("native_sixteen_bit=%s is ignored: it chooses how a 16-bit model's linears multiply when a CPU "
                    "backend runs them, and %s", native_sixteen_bit,
                    f"backend {backend!r} runs the model in its own dtype" if backend not in sixteen_bit.WIDENS
                    else f"backend {backend!r} has no CPU kernel to lower to here" if not sixteen_bit.widens(backend)
                    else "this model's weights are not all bfloat16 or float16 on the CPU")
    if weight_storage is not None and backend in sixteen_bit.WIDENS:
        log.info("%s weights on the CPU: %s", weight_storage,
                 f"the linears multiply in {weight_storage} on oneDNN (float32 between them)" if matmul_dtype
                 else f"float32 arithmetic, the linear weights kept in {weight_storage}"
                 + ("" if native_sixteen_bit is False else f" ({sixteen_bit.why_not_native(weight_storage)})"
                    if sixteen_bit.why_not_native(weight_storage) else ""))
    start = time.perf_counter()
    gm = capture(model, max_tokens=max_tokens)
    capture_seconds = time.perf_counter() - start
    manager = PassManager(DEFAULT_PIPELINE, keep_stages=keep_stages)
    final = manager.run(gm)
    info = final.meta["orca"]
    info.weight_storage = weight_storage if backend in sixteen_bit.WIDENS else None
    info.matmul_dtype = matmul_dtype
    info.module_paths = {}  # only the passes read HF's modules; keep none reachable from the result
    if tensor_parallel_size != 1 or rank != 0 or pipeline_parallel_size != 1:
        steps = []
        if pipeline_parallel_size != 1 or stage != 0:
            steps.append(("pipelined", functools.update_wrapper(
                functools.partial(pipeline_stage, stage=stage, num_stages=pipeline_parallel_size,
                                  cuts=list(cuts) if cuts else None), pipeline_stage)))
        if tensor_parallel_size != 1 or rank != 0:
            steps.append(("partitioned", functools.update_wrapper(
                functools.partial(tensor_parallel, rank=rank, world_size=tensor_parallel_size, replicated=replicated,
                                  vocab_parallel_head=vocab_parallel_head and stage == pipeline_parallel_size - 1),
                tensor_parallel)))
        manager.pipeline = steps
        final = manager.run(final)
    device = None
    if materialize is not None:
        final = materialize(final)
        device = next(t.device for t in (fetch_attr(final, n.target) for n in final.graph.find_nodes(op="get_attr"))
                      if isinstance(t, torch.Tensor))
    resolved = resolve_backend(backend, final)
    lowered = _lower(final, resolved, manager)
    if not keep_stages and lowered is not final:
        manager.stages.pop("final", None)
        manager.stages.pop("partitioned", None)
        manager.stages.pop("pipelined", None)
    return CompiledModel(lowered, manager.stages, manager.records, capture_seconds, info.config, info.model_class,
                         backend=resolved, eos_token_ids=eos_token_ids(model), device=device)


def lower(compiled: CompiledModel, backend: str, keep_stages: bool | None = None) -> CompiledModel:
    """``compiled`` lowered for ``backend``: itself when it is lowered for that backend already (or
    ``backend`` is ``auto`` and it is lowered for something), else a new ``CompiledModel`` lowered
    from its ``final`` graph, which stays as it was (other engines may run it). ``keep_stages``
    (default: whether ``compiled`` kept its stages) keeps a copy of each lowering stage's graph."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; one of {', '.join(BACKENDS)}")
    if backend == compiled.backend or (backend == "auto" and compiled.backend != "eager"):
        return compiled
    final = compiled.stages.get("final")
    if final is None:
        raise ValueError(f"this CompiledModel was lowered for {compiled.backend!r} without keeping its 'final' "
                         f"graph; compile the model again with backend={backend!r}")
    resolved = resolve_backend(backend, final)
    if resolved == compiled.backend:
        return compiled
    if keep_stages is None:
        keep_stages = "captured" in compiled.stages
    manager = PassManager([], keep_stages=keep_stages)
    # the portable stages and their passes' records; none of another lowering's
    portable = ("captured", *(stage for stage, _ in DEFAULT_PIPELINE))
    manager.stages = {k: v for k, v in compiled.stages.items() if k in portable}
    manager.records = [r for r in compiled.records if r.stage in portable]
    lowered = _lower(final, resolved, manager)
    return CompiledModel(lowered, manager.stages, manager.records, compiled.capture_seconds, compiled.config,
                         compiled.model_class, backend=resolved, eos_token_ids=compiled.eos_token_ids,
                         device=compiled.device)


def _lower(final: torch.fx.GraphModule, backend: str, manager: PassManager) -> torch.fx.GraphModule:
    manager.pipeline = lowering_pipeline(backend)
    lowered = manager.run(final)
    manager.stages["lowered"] = lowered
    return lowered


def eos_token_ids(model) -> tuple[int, ...]:
    """The ids HF ``generate`` stops at: the generation config's, else the model config's."""
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Where a worker gets its model from, and how to compile it: picklable, so that an executor
    in another process builds its own artifact (``build()``) instead of receiving a model over a
    pipe. ``source``: a preset name, a checkpoint directory or a hub id; an HF model object or a
    ``CompiledModel`` (in-process executors and small tests). Later: the partition plan and the
    rank whose shard to build."""

    source: object
    backend: str = "auto"
    dtype: str | None = None
    device: str | None = None
    tensor_parallel_size: int = 1
    rank: int = 0  # which shard this worker builds
    pipeline_parallel_size: int = 1  # stages; rank = stage * tensor_parallel_size + the rank in the stage
    cuts: tuple | None = None  # a plan's stage cuts (None: as even as the layers allow)
    replicated: tuple = ()  # a plan's blocks (kind, layer) that every tensor-parallel rank runs whole
    vocab_parallel_head: bool = False
    native_sixteen_bit: bool | None = None  # a 16-bit checkpoint's linears: see orca_compile/sixteen_bit.py

    def __post_init__(self):
        sixteen_bit.check_native(self.native_sixteen_bit)
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; one of {', '.join(BACKENDS)}")
        tp = self.tensor_parallel_size
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {tp!r}")
        pp = self.pipeline_parallel_size
        if isinstance(pp, bool) or not isinstance(pp, int) or pp < 1:
            raise ValueError(f"pipeline_parallel_size must be an integer >= 1, got {pp!r}")
        if not 0 <= self.rank < tp * pp:
            raise ValueError(f"rank {self.rank} is outside [0, {tp * pp})")
        if (tp > 1 or pp > 1) and isinstance(self.source, CompiledModel):
            raise ValueError("a CompiledModel is one rank's graph already; give a checkpoint path or a model object "
                             "to shard it")

    def for_rank(self, rank: int) -> "ModelSpec":
        """The description a worker of rank ``rank`` builds from."""
        return dataclasses.replace(self, rank=rank)

    @property
    def device_type(self) -> str:
        """Where the built model will run (``cpu``, ``cuda``), known before it is built."""
        src = self.source
        if isinstance(src, CompiledModel):
            return src.device.type
        if isinstance(src, torch.nn.Module):
            return next((p.device.type for p in src.parameters()), "cpu")
        return torch.device(self.device or "cpu").type

    def build(self) -> CompiledModel:
        src = self.source
        if isinstance(src, CompiledModel):
            return lower(src, self.backend)
        if isinstance(src, (str, os.PathLike)):
            from orca_compile.materialize import has_safetensors

            if self.world_size > 1 and has_safetensors(os.fspath(src)):
                try:
                    return self._build_shard(os.fspath(src))
                except ValueError as exc:  # a tensor the files do not hold under its name: load it whole
                    log.warning("rank %d reads the whole checkpoint (%s)", self.rank, exc)
            from orca_compile.presets import load_model

            dtype, storage = self.dtype, self._checkpoint_sixteen_bit(os.fspath(src))
            if storage is not None:  # read it as float32 (exactly), no 16-bit copy on the side
                dtype = torch.float32
            src = load_model(os.fspath(src), dtype=dtype, device=self.device)
        else:
            storage = None
        if not isinstance(src, torch.nn.Module):
            raise ValueError(f"a model is an HF model, a CompiledModel or a checkpoint path, got {type(src).__name__}")
        # keep_stages=False: the lowered graph holds the only copy of each packed weight once the
        # model object is gone (a caller's model object keeps its own)
        tp = self.tensor_parallel_size
        return compile(src, backend=self.backend, keep_stages=False, tensor_parallel_size=tp, rank=self.rank % tp,
                       pipeline_parallel_size=self.pipeline_parallel_size, stage=self.rank // tp, cuts=self.cuts,
                       replicated=self.replicated, vocab_parallel_head=self.vocab_parallel_head,
                       weight_storage=storage, native_sixteen_bit=self.native_sixteen_bit)

    def _checkpoint_sixteen_bit(self, path: str) -> torch.dtype | None:
        """bfloat16 or float16 when the checkpoint directory or hub id ``path`` is to run with 16-bit
        weights under float32 arithmetic (its dtype, or the one asked for, is 16-bit; the CPU; a
        backend that keeps them: ``compile``'s rule), else None. Presets are built in memory, not
        read: ``compile`` widens those itself."""
        from orca_compile.presets import preset_names

        if (not sixteen_bit.widens(self.backend) or torch.device(self.device or "cpu").type != "cpu"
                or path in preset_names()):
            return None
        from transformers import AutoConfig

        from orca_compile.planning import config_dtype

        try:
            stored = config_dtype(AutoConfig.from_pretrained(path))
        except (OSError, ValueError):  # load_model says what is wrong with the path
            return None
        # another dtype asked for: HF converts every weight to it, and compile widens that model
        asked = config_dtype(None, self.dtype) if self.dtype else stored
        if stored not in (torch.bfloat16, torch.float16) or asked != stored:
            return None
        return stored

    def _build_shard(self, directory: str) -> CompiledModel:
        """This rank's graph from a checkpoint directory, reading only its shard's bytes: the
        model built, captured and partitioned on meta tensors, then filled from the files."""
        from orca_compile.materialize import CheckpointReader, empty_model, materialize
        from orca_compile.planning import config_dtype

        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(directory)
        model_dtype = getattr(config, "dtype", None)
        probe = CheckpointReader(directory)
        # as from_pretrained(dtype="auto"): the config's dtype, else the checkpoint's
        dtype = config_dtype(config, self.dtype) if self.dtype or model_dtype else probe.dtype()
        storage = None
        if (dtype in (torch.bfloat16, torch.float16) and dtype == probe.dtype() and sixteen_bit.widens(self.backend)
                and torch.device(self.device or "cpu").type == "cpu"):  # compile's rule for 16-bit weights
            storage, dtype = dtype, torch.float32  # filled in float32 (exactly), packed back to 16 bits
        model, buffers, aliases, prefix = empty_model(directory, dtype)
        reader = CheckpointReader(directory, aliases, prefix)
        tp = self.tensor_parallel_size
        compiled = compile(model, backend=self.backend, keep_stages=False, tensor_parallel_size=tp,
                           rank=self.rank % tp, pipeline_parallel_size=self.pipeline_parallel_size,
                           stage=self.rank // tp, cuts=self.cuts, replicated=self.replicated,
                           vocab_parallel_head=self.vocab_parallel_head, weight_storage=storage,
                           native_sixteen_bit=self.native_sixteen_bit,
                           materialize=lambda gm: materialize(gm, reader, buffers, dtype, self.device or "cpu"))
        compiled.bytes_read = reader.bytes_read
        return compiled

    @property
    def world_size(self) -> int:
        """Processes the model runs on: one per tensor-parallel rank or pipeline stage."""
        return self.tensor_parallel_size * self.pipeline_parallel_size
