"""The automatic planner: which tp x pp, where the stage cuts go, and which blocks to shard.

Alpa's two levels, for serving:

* **Intra-operator** (an integer program per stage, SciPy's ``milp`` on HiGHS): for the layers of
  one stage on ``tp`` devices, how many of each layer class run their attention block sharded by
  heads (Megatron: column-parallel q/k/v, row-parallel output, one all-reduce) and how many run it
  whole on every rank (no all-reduce, ``tp`` times the weights, the work and, for attention, the KV
  cache), the same for the MLP block, and whether the LM head is vocab-parallel (a shard of the
  vocabulary per rank, the logits all-gathered) or whole. Objective: the stage's time on the
  iteration the user optimises; constraint: the stage's weights plus the KV cache of the target
  batch fit the device memory. Layers of one class cost alike, so the variables are counts
  (``0..n`` per class and block), and the solution names concrete layers (the first of each
  class in the stage are sharded).
* **Inter-operator** (a dynamic program over the stage cuts): ``F[k][j]``, the best ``k`` stages
  over the first ``j`` layers. Objective ``latency``: the sum of the stage times plus the
  boundary transfers (one iteration passes every stage), minimised. Objective ``throughput``:
  Orca's pipelining keeps ``pp`` iterations in flight, so a batch leaves every ``max(stage)``;
  the DP minimises the latency with every stage under a bound ``t_max``, and a binary search over
  the candidate stage times finds the smallest ``t_max`` whose latency meets the user's bound
  (Alpa enumerates ``t_max`` the same way). The iterations in flight split the workload's
  requests among them, as the engine's scheduler does (each ``ceil(batch / pp)``), and the
  stages hold the KV cache of all of them.

Costs come from the graph (``cost_model.part_costs``): every node's FLOPs, bytes and collectives
are grouped into parts (a layer's attention, MLP and the rest; the prelude; the LM head and what
follows it) on the graph sharded ``tp`` ways and on the whole graph. A part's time on a device is
a roofline (FLOPs at the matmul rate, bytes at the memory rate) plus its collectives (ring
all-reduce: ``2 (p - 1) / p`` of the bytes over the link and ``2 (p - 1)`` latencies; all-gather:
``p - 1`` parts and latencies) plus a launch cost per op.

The planner needs no weights: ``profile`` reads a graph captured on meta tensors, and one layer
of each class suffices (a model whose layers repeat a pattern is captured one period deep; the
costs of a layer do not depend on how many others there are).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os

import numpy as np
import sympy
import torch

from orca_compile.ops import ATTENTION
from orca_compile.passes.partition.cost_model import Machine, PartCost, part_costs
from orca_compile.passes.partition.pipeline_split import layer_of
from orca_compile.passes.partition.tensor_parallel import blocks, tensor_parallel

log = logging.getLogger(__name__)

KINDS = ("attention", "mlp")
OBJECTIVES = ("latency", "throughput")
GB = 1e9


# ---- the machine -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Cluster:
    """Devices and links, from a JSON file (``Cluster.load``) or measured here. Bandwidths are in
    GB/s (1e9 bytes per second), as the vendors quote NVLink and HBM; a network's 400 Gb/s is 50.
    ``intra_node_bandwidth_gbps`` is one device's all-reduce bus bandwidth inside a node (NCCL's
    ``busbw``), ``inter_node_bandwidth_gbps`` the same across nodes (per device: the node's NICs
    shared by its devices)."""

    nodes: int
    devices_per_node: int
    device_memory_gib: float
    device_tflops: float  # dense matmul rate in the model's dtype, achieved (not the datasheet peak)
    device_memory_bandwidth_gbps: float
    intra_node_bandwidth_gbps: float
    inter_node_bandwidth_gbps: float
    intra_node_latency_us: float = 5.0  # one step of a collective inside a node
    inter_node_latency_us: float = 15.0
    op_overhead_us: float = 4.0  # launching one op (a kernel; a CUDA graph makes this ~0)
    memory_utilization: float = 0.9  # of device memory for weights and KV (the rest: activations, runtime)
    name: str = ""

    FIELDS = ("nodes", "devices_per_node", "device_memory_gib", "device_tflops", "device_memory_bandwidth_gbps",
              "intra_node_bandwidth_gbps", "inter_node_bandwidth_gbps")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "name":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"cluster: {f.name} must be a number >= 0, got {v!r}")
        for f in ("nodes", "devices_per_node"):
            if int(getattr(self, f)) != getattr(self, f) or getattr(self, f) < 1:
                raise ValueError(f"cluster: {f} must be an integer >= 1, got {getattr(self, f)!r}")
        for f in ("device_memory_gib", "device_tflops", "device_memory_bandwidth_gbps"):
            if getattr(self, f) <= 0:
                raise ValueError(f"cluster: {f} must be > 0, got {getattr(self, f)!r}")
        if not 0 < self.memory_utilization <= 1:
            raise ValueError(f"cluster: memory_utilization must be in (0, 1], got {self.memory_utilization!r}")

    @classmethod
    def from_dict(cls, data: dict) -> "Cluster":
        if not isinstance(data, dict):
            raise ValueError(f"a cluster is a JSON object, got {type(data).__name__}")
        missing = [f for f in cls.FIELDS if f not in data]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"comment", "source"})
        if missing or unknown:
            raise ValueError(f"cluster: missing {missing}" if missing else f"cluster: unknown keys {unknown}; "
                             f"known: {sorted(known)}")
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Cluster":
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read the cluster file {os.fspath(path)!r}: {exc}") from None
        data.setdefault("name", os.path.splitext(os.path.basename(os.fspath(path)))[0])
        return cls.from_dict(data)

    @classmethod
    def from_machine(cls, machine: Machine, devices: int, memory_bytes: float, name: str = "this machine"):
        """One node of ``devices`` processes with ``machine``'s measured rates each."""
        link = machine.link_bytes_per_second or 1.0
        return cls(nodes=1, devices_per_node=devices, device_memory_gib=memory_bytes / 2**30,
                   device_tflops=machine.flops_per_second / 1e12,
                   device_memory_bandwidth_gbps=machine.memory_bytes_per_second / GB,
                   intra_node_bandwidth_gbps=link / GB, inter_node_bandwidth_gbps=link / GB,
                   intra_node_latency_us=machine.link_latency_seconds * 1e6,
                   inter_node_latency_us=machine.link_latency_seconds * 1e6,
                   op_overhead_us=machine.op_overhead_seconds * 1e6, memory_utilization=1.0, name=name)

    @property
    def num_devices(self) -> int:
        return self.nodes * self.devices_per_node

    @property
    def memory_bytes(self) -> float:
        return self.device_memory_gib * 2**30 * self.memory_utilization

    def machine(self, tp: int) -> Machine:
        """One device, with the link its ``tp``-way group all-reduces over (inside a node, or
        across nodes when the group spans them)."""
        inside = tp <= self.devices_per_node
        bw = self.intra_node_bandwidth_gbps if inside else self.inter_node_bandwidth_gbps
        lat = self.intra_node_latency_us if inside else self.inter_node_latency_us
        return Machine(self.device_tflops * 1e12, self.device_memory_bandwidth_gbps * GB, bw * GB, lat * 1e-6,
                       self.op_overhead_us * 1e-6)

    def stage_link(self, tp: int, stage: int) -> tuple[float, float]:
        """(bytes/s, seconds) of the hop from stage ``stage`` to the next: inside a node or not."""
        a, b = stage * tp, (stage + 1) * tp
        inside = a // self.devices_per_node == b // self.devices_per_node
        if inside:
            return self.intra_node_bandwidth_gbps * GB, self.intra_node_latency_us * 1e-6
        return self.inter_node_bandwidth_gbps * GB, self.inter_node_latency_us * 1e-6


# ---- what an iteration is -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Iteration:
    """One iteration's shape: ``requests`` requests, each with ``new`` new tokens at the end of a
    context of ``context`` tokens (new ones included)."""

    kind: str
    requests: int
    new: int
    context: int

    @property
    def tokens(self) -> int:
        return self.requests * self.new

    def pairs(self, window: int = 0) -> int:
        """(query, visible key) pairs: each new token sees its causal prefix (a window caps it)."""
        first, last = self.context - self.new + 1, self.context  # the new tokens' positions, from 1

        def span(a, b):  # a + (a + 1) + ... + b
            return (a + b) * (b - a + 1) // 2 if b >= a else 0

        if not window or window >= last:
            total = span(first, last)
        else:  # positions up to the window see all before them, later ones the window
            total = span(first, min(last, window)) + window * (last - max(first, window + 1) + 1)
        return self.requests * total

    def keys(self, window: int = 0) -> int:
        """Cached tokens whose K/V are read: each request's context (a window's worth at most)."""
        return self.requests * (min(self.context, window) if window else self.context)


@dataclasses.dataclass(frozen=True)
class Workload:
    """What the plan must serve: ``batch_size`` requests decoding together with contexts of
    ``context_len`` tokens (the decode-heavy iteration; the KV cache must hold them), and
    prefill-heavy iterations of ``prefill_tokens`` new tokens in prompts of ``prompt_len``."""

    batch_size: int = 32
    context_len: int = 1024
    prefill_tokens: int = 2048
    prompt_len: int = 512

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"workload: {f.name} must be an integer >= 1, got {v!r}")
        if self.prompt_len > self.prefill_tokens:
            raise ValueError(f"workload: prompt_len {self.prompt_len} exceeds prefill_tokens {self.prefill_tokens}")

    def iteration(self, kind: str) -> Iteration:
        if kind == "decode":
            return Iteration("decode", self.batch_size, 1, self.context_len)
        if kind == "prefill":
            return Iteration("prefill", self.prefill_tokens // self.prompt_len, self.prompt_len, self.prompt_len)
        raise ValueError(f"an iteration is 'decode' or 'prefill', got {kind!r}")


# ---- the model's costs, part by part --------------------------------------------------------------

@dataclasses.dataclass
class _Parts:
    """One tensor-parallel degree's parts: ``layer[(cls, kind)]`` for kind in attention, mlp,
    rest; ``prelude``; ``head`` (the LM head, and its all-gather when vocab-parallel); ``epilogue``
    (the final norm, a soft-cap)."""

    layer: dict
    prelude: PartCost
    head: PartCost | None
    epilogue: PartCost
    tokens: sympy.Symbol
    rows: sympy.Symbol | None


def _group(gm) -> tuple[dict, sympy.Symbol, sympy.Symbol | None]:
    """Parts of ``gm`` keyed ``(layer, kind)``, ``("prelude",)``, ``("head",)``, ``("epilogue",)``.
    A sharded graph carries each node's block in ``meta["orca_block"]`` (the tensor-parallel pass
    tags them before rewriting; its all-reduces and all-gathers inherit the tag)."""
    tagged = {n: n.meta["orca_block"] for n in gm.graph.nodes if n.meta.get("orca_block")}
    kinds = tagged or blocks(gm.graph)
    seen_layer = [False]

    def part_of(node):
        kind = kinds.get(node)
        if kind is not None and kind[0] == "head":
            return ("head",)
        layer = layer_of(node)
        if layer is None:
            return ("epilogue",) if seen_layer[0] else ("prelude",)
        seen_layer[0] = True
        return (layer, kind[0] if kind is not None else "rest")

    return part_costs(gm, part_of)


@dataclasses.dataclass
class ModelProfile:
    """A model's parts at each tensor-parallel degree it may run at, read off its graph."""

    num_layers: int
    layer_class: list  # the full model's layer i is probe layer layer_class[i]
    parts: dict  # tp -> _Parts
    shardable: dict  # tp -> {"attention": bool, "mlp": bool, "head": bool}
    hidden_bytes_per_token: int  # what crosses a stage boundary
    name: str = ""

    @property
    def tensor_parallel_sizes(self) -> list[int]:
        return sorted(self.parts)


def profile(final: torch.fx.GraphModule, num_layers: int | None = None, layer_class: list | None = None,
            max_tensor_parallel: int = 8, name: str = "") -> ModelProfile:
    """The parts of ``final`` (a ``final``-stage graph, on meta tensors or real ones) sharded each
    way ``t <= max_tensor_parallel`` allows. ``final`` may be a probe holding one period of a
    deeper model's layers: ``num_layers`` and ``layer_class`` (probe layer of each real layer)
    describe the real one."""
    probe_layers = len(list(final.graph.find_nodes(op="call_function", target=ATTENTION)))
    num_layers = num_layers or probe_layers
    layer_class = list(layer_class) if layer_class is not None else [i % probe_layers for i in range(num_layers)]
    if len(layer_class) != num_layers or not all(0 <= c < probe_layers for c in layer_class):
        raise ValueError(f"layer_class must give each of the {num_layers} layers a probe layer in [0, {probe_layers})")
    parts, shardable = {}, {}
    for t in range(1, max_tensor_parallel + 1):
        gm, ok = _shard_what_divides(final, t, probe_layers)
        if gm is None:
            continue
        grouped, tokens, rows = _group(gm)
        layer = {(k[0], k[1]): v for k, v in grouped.items() if isinstance(k[0], int)}
        parts[t] = _Parts(layer, grouped.get(("prelude",), PartCost()), grouped.get(("head",)),
                          grouped.get(("epilogue",), PartCost()), tokens, rows)
        shardable[t] = ok
    width = _hidden_width(final)
    dtype_bytes = next((p.element_size() for p in final.parameters() if p.is_floating_point()), 4)
    return ModelProfile(num_layers, layer_class, parts, shardable, width * dtype_bytes, name)


def _hidden_width(final) -> int:
    """The residual stream's width: the embedding's output features."""
    for n in final.graph.nodes:
        if n.op == "call_function" and n.target is torch.ops.aten.embedding.default:
            return int(n.meta["val"].shape[-1])
    raise ValueError("planner: no embedding in the graph to read the hidden size from")


def _shard_what_divides(final, t, probe_layers):
    """``final`` sharded ``t`` ways with every kind of block that ``t`` divides (the others kept
    whole), rank 0's graph, and which kinds were sharded; None when nothing divides."""
    if t == 1:
        return final, {"attention": False, "mlp": False, "head": False}
    kinds = {}
    for kind in KINDS:
        other = [(k, layer) for k in KINDS if k != kind for layer in range(probe_layers)]
        try:
            tensor_parallel(final, 0, t, replicated=other)
            kinds[kind] = True
        except ValueError:
            kinds[kind] = False
    if not any(kinds.values()):
        return None, None
    replicated = [(k, layer) for k in KINDS if not kinds[k] for layer in range(probe_layers)]
    try:
        gm = tensor_parallel(final, 0, t, replicated=replicated, vocab_parallel_head=True)
        kinds["head"] = True
    except ValueError:
        gm = tensor_parallel(final, 0, t, replicated=replicated)
        kinds["head"] = False
    return gm, kinds


# ---- pricing a part ------------------------------------------------------------------------------

def _subs(expr, parts: _Parts, it: Iteration) -> float:
    subs = {parts.tokens: it.tokens}
    if parts.rows is not None:
        subs[parts.rows] = it.requests
    return float(expr.subs(subs)) if isinstance(expr, sympy.Expr) else float(expr)


def part_seconds(part: PartCost, parts: _Parts, it: Iteration, machine: Machine, world: int) -> float:
    """A part's time for iteration ``it`` on one device of a ``world``-way group."""
    flops = _subs(part.matmul_flops, parts, it) + part.attention_flops_per_key * it.pairs(part.sliding_window)
    nbytes = (sum(part.streamed.values()) + 2 * _subs(part.activation_bytes, parts, it)
              + part.kv_bytes_per_token * it.keys(part.sliding_window))
    seconds = max(flops / machine.flops_per_second, nbytes / machine.memory_bytes_per_second)
    p = world
    if p > 1 and part.num_collectives:
        bw = machine.link_bytes_per_second
        comm = 2 * (p - 1) / p * _subs(part.comm_bytes, parts, it) + (p - 1) * _subs(part.gather_bytes, parts, it)
        steps = part.num_collectives * (p - 1) * (2 if part.comm_bytes != 0 else 1)
        seconds += comm / bw + steps * machine.link_latency_seconds
    return seconds + part.num_ops * machine.op_overhead_seconds


# ---- a plan --------------------------------------------------------------------------------------

@dataclasses.dataclass
class Plan:
    """A partition of the model over ``tensor_parallel_size * pipeline_parallel_size`` devices,
    with its predicted cost. ``replicated``: the blocks ``(kind, layer)`` run whole on every rank
    of their stage; ``cuts``: the first layer of each stage, then the layer count."""

    tensor_parallel_size: int
    pipeline_parallel_size: int
    cuts: list
    replicated: list
    vocab_parallel_head: bool
    objective: str
    stage_seconds: dict  # iteration kind -> each stage's predicted seconds
    boundary_seconds: dict  # iteration kind -> the stage-to-stage transfers, summed
    memory_bytes: list  # per stage: {"weights", "kv_cache", "total"} of one of its ranks
    memory_limit_bytes: float
    workload: Workload
    iterations: dict = dataclasses.field(default_factory=dict)  # kind -> the shape each iteration has

    @property
    def num_devices(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def iteration_seconds(self, kind: str = "decode") -> float:
        """One iteration through every stage (what a request waits per token)."""
        return sum(self.stage_seconds[kind]) + self.boundary_seconds[kind]

    @property
    def predicted_iteration_seconds(self) -> float:
        return self.iteration_seconds("decode")

    def tokens_per_second(self, kind: str = "decode") -> float:
        """Tokens of ``kind`` iterations per second. Objective ``throughput``: Orca's pipelining,
        an iteration in flight per stage, one finishing per slowest stage; ``latency``: one
        iteration at a time through every stage."""
        it = self.iterations.get(kind) or self.workload.iteration(kind)
        if self.objective == "throughput":
            return it.tokens / max(self.stage_seconds[kind])
        return it.tokens / self.iteration_seconds(kind)

    def to_dict(self) -> dict:
        return {"tensor_parallel_size": self.tensor_parallel_size, "pipeline_parallel_size": self.pipeline_parallel_size,
                "devices": self.num_devices, "cuts": list(self.cuts),
                "replicated": [list(b) for b in self.replicated], "vocab_parallel_head": self.vocab_parallel_head,
                "objective": self.objective,
                "predicted_iteration_seconds": {k: self.iteration_seconds(k) for k in self.stage_seconds},
                "stage_seconds": self.stage_seconds, "boundary_seconds": self.boundary_seconds,
                "tokens_per_second": {k: self.tokens_per_second(k) for k in self.stage_seconds},
                "memory_bytes_per_rank": self.memory_bytes, "memory_limit_bytes": self.memory_limit_bytes,
                "workload": dataclasses.asdict(self.workload)}

    def describe(self) -> str:
        if self.tensor_parallel_size == 1:
            sharded = "unsharded"
        else:
            sharded = "every block sharded" if not self.replicated else f"{len(self.replicated)} blocks whole"
        mem = max(m["total"] for m in self.memory_bytes) / 2**30
        return (f"tp={self.tensor_parallel_size} pp={self.pipeline_parallel_size} cuts={self.cuts} ({sharded}, "
                f"{'vocab-parallel' if self.vocab_parallel_head else 'replicated'} head): "
                f"decode {self.iteration_seconds('decode') * 1e3:.3g} ms/iteration "
                f"({self.tokens_per_second('decode'):.4g} tok/s), prefill {self.iteration_seconds('prefill') * 1e3:.3g} "
                f"ms, {mem:.3g} GiB per rank")


@dataclasses.dataclass(frozen=True)
class _Stage:
    seconds: float  # on the objective's iteration
    choice: tuple  # per class: (attention sharded, mlp sharded) counts; then the head's 0/1
    memory: dict


class Planner:
    """Plans ``profile`` on ``cluster`` for ``workload``; ``plans(devices)`` lists the best plan of
    each (tp, pp), best first."""

    def __init__(self, profile: ModelProfile, cluster: Cluster, workload: Workload = Workload(),
                 objective: str = "latency", iteration: str = "decode", latency_bound: float | None = None):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if latency_bound is not None and not latency_bound > 0:
            raise ValueError(f"the latency bound must be > 0 seconds, got {latency_bound!r}")
        self.profile, self.cluster, self.workload = profile, cluster, workload
        self.objective, self.kind, self.latency_bound = objective, iteration, latency_bound
        self.iterations = {k: workload.iteration(k) for k in ("decode", "prefill")}
        self._stage_cache: dict = {}
        self._price_cache: dict = {}
        self.ilp_solves = 0

    def iteration(self, kind: str, depth: int = 1) -> Iteration:
        """The ``kind`` iteration with ``depth`` iterations in flight: each takes its share of the
        requests, as the engine's scheduler splits them (``ceil(requests / depth)``)."""
        it = self.iterations[kind]
        return dataclasses.replace(it, requests=-(-it.requests // depth)) if depth > 1 else it

    # prices of one probe part, cached
    def _price(self, t: int, key, kind: str, depth: int = 1) -> float:
        ck = (t, key, kind, depth)
        if ck not in self._price_cache:
            parts = self.profile.parts[t]
            part = parts.layer.get(key) if isinstance(key, tuple) else getattr(parts, key)
            self._price_cache[ck] = 0.0 if part is None else part_seconds(
                part, parts, self.iteration(kind, depth), self.cluster.machine(t), t)
        return self._price_cache[ck]

    def _memory(self, t: int, key) -> tuple[float, float]:
        """(weight bytes, KV bytes per token held) of one probe part at degree ``t``."""
        parts = self.profile.parts[t]
        part = parts.layer.get(key) if isinstance(key, tuple) else getattr(parts, key)
        if part is None:
            return 0.0, 0.0
        return float(part.weight_bytes), float(part.kv_bytes_per_token)

    def stage(self, t: int, lo: int, hi: int, depth: int = 1) -> _Stage | None:
        """The integer program of layers ``[lo, hi)`` on ``t`` devices: the fastest choice that fits."""
        prof = self.profile
        classes = prof.layer_class[lo:hi]
        counts = tuple(classes.count(c) for c in range(max(prof.layer_class) + 1))
        first, last = lo == 0, hi == prof.num_layers
        key = (t, counts, first, last, depth)
        if key in self._stage_cache:
            return self._stage_cache[key]
        result = self._solve(t, counts, first, last, depth)
        self._stage_cache[key] = result
        return result

    def _solve(self, t, counts, first, last, depth):
        from scipy.optimize import Bounds, LinearConstraint, milp

        ok = self.profile.shardable[t]
        held = self.workload.batch_size * self.workload.context_len  # tokens in the cache (all iterations')
        kind = self.kind
        # constants: everything whole (t = 1 prices) where a block may be whole, plus the rest
        c_time, c_mem = 0.0, 0.0
        deltas_time, deltas_mem, upper = [], [], []
        for cls, n in enumerate(counts):
            if not n:
                continue
            rest_w, _ = self._memory(t, (cls, "rest"))
            c_time += n * self._price(t, (cls, "rest"), kind, depth)
            c_mem += n * rest_w
            for k in KINDS:
                whole_w, whole_kv = self._memory(1, (cls, k))
                whole_s = self._price(1, (cls, k), kind, depth)
                c_time += n * whole_s
                c_mem += n * (whole_w + whole_kv * held)
                if ok[k]:
                    w, kv = self._memory(t, (cls, k))
                    deltas_time.append(self._price(t, (cls, k), kind, depth) - whole_s)
                    deltas_mem.append(w + kv * held - whole_w - whole_kv * held)
                    upper.append(n)
                else:
                    deltas_time.append(0.0)
                    deltas_mem.append(0.0)
                    upper.append(0)
        prelude_ids = set()
        if first:
            c_time += self._price(1, "prelude", kind, depth)
            c_mem += self._memory(1, "prelude")[0]
            prelude_ids = set(self.profile.parts[1].prelude.weights)
        if last:
            c_time += self._price(1, "epilogue", kind, depth) + self._price(1, "head", kind, depth)
            head = self.profile.parts[1].head
            whole_w = sum(b for i, b in head.weights.items() if i not in prelude_ids) if head else 0.0
            c_mem += self._memory(1, "epilogue")[0] + whole_w
            if ok["head"]:
                w, _ = self._memory(t, "head")
                deltas_time.append(self._price(t, "head", kind, depth) - self._price(1, "head", kind, depth))
                deltas_mem.append(w - whole_w)
                upper.append(1)
        limit = self.cluster.memory_bytes
        if not deltas_time:
            return _Stage(c_time, (), {"weights": c_mem, "kv_cache": 0.0}) if c_mem <= limit else None
        c = np.array(deltas_time)
        a = np.array([deltas_mem])
        self.ilp_solves += 1
        res = milp(c, integrality=np.ones_like(c), bounds=Bounds(np.zeros_like(c), np.array(upper, dtype=float)),
                   constraints=LinearConstraint(a, -np.inf, limit - c_mem))
        if res.status != 0 or res.x is None:  # 2: infeasible: even sharding everything does not fit
            return None
        x = np.round(res.x).astype(int)
        return _Stage(c_time + float(c @ x), tuple(int(v) for v in x), {})

    # ---- the stage cuts -----------------------------------------------------------------------------

    def best(self, t: int, pp: int) -> Plan | None:
        """The best cuts (and intra-operator choices) for ``pp`` stages of ``t`` devices."""
        L = self.profile.num_layers
        if pp > L:
            return None
        depth = pp if self.objective == "throughput" else 1  # iterations in flight
        cost = {}
        for lo in range(L):
            for hi in range(lo + 1, L + 1):
                cost[lo, hi] = self.stage(t, lo, hi, depth)
        boundary = self._boundary(t, pp, self.kind, depth)
        bound = self.latency_bound
        if self.objective == "latency":  # the least sum; among the splits that reach it, the most even
            fastest = self._dp(L, pp, cost, math.inf)
            bound = None if fastest is None else (fastest[1] + boundary) * (1 + 1e-9)
        candidates = sorted({s.seconds for s in cost.values() if s is not None})
        cuts, lo_i, hi_i = None, 0, len(candidates) - 1
        while lo_i <= hi_i:  # the smallest t_max whose best latency meets the bound
            mid = (lo_i + hi_i) // 2
            got = self._dp(L, pp, cost, candidates[mid])
            if got is not None and (bound is None or got[1] + boundary <= bound):
                cuts, hi_i = got, mid - 1
            else:
                lo_i = mid + 1
        if cuts is None and self.objective == "throughput" and self.latency_bound is not None:
            cuts = self._dp(L, pp, cost, math.inf)  # nothing meets the bound: the fastest, ranked last
        if cuts is None:
            return None
        plan = self._plan(t, pp, cuts[0], cost)
        blocks_total = 2 * L
        if t > 1 and len(plan.replicated) == blocks_total and not plan.vocab_parallel_head:
            return None  # shards nothing: the tp = 1 plan's work on t times the devices
        return plan

    @staticmethod
    def _dp(L, pp, cost, t_max):
        """(cuts, summed stage seconds) of the ``pp``-stage split with the least sum, each stage
        at most ``t_max``; None if none."""
        inf = math.inf
        best = [[inf] * (L + 1) for _ in range(pp + 1)]
        back = [[-1] * (L + 1) for _ in range(pp + 1)]
        best[0][0] = 0.0
        for k in range(1, pp + 1):
            for hi in range(k, L - (pp - k) + 1):
                for lo in range(k - 1, hi):
                    s = cost[lo, hi]
                    if s is None or s.seconds > t_max or best[k - 1][lo] == inf:
                        continue
                    v = best[k - 1][lo] + s.seconds
                    if v < best[k][hi]:
                        best[k][hi], back[k][hi] = v, lo
        if best[pp][L] == inf:
            return None
        cuts, hi = [L], L
        for k in range(pp, 0, -1):
            hi = back[k][hi]
            cuts.append(hi)
        return cuts[::-1], best[pp][L]

    def _boundary(self, t, pp, kind, depth=1) -> float:
        it = self.iteration(kind, depth)
        total = 0.0
        for s in range(pp - 1):
            bw, lat = self.cluster.stage_link(t, s)
            total += it.tokens * self.profile.hidden_bytes_per_token / bw + lat
        return total

    def _plan(self, t, pp, cuts, cost) -> Plan:
        """The plan of the ILP's choices: the first of each class's layers in a stage sharded."""
        prof = self.profile
        replicated, head_vp = set(), False
        for s in range(pp):
            lo, hi = cuts[s], cuts[s + 1]
            choice = cost[lo, hi].choice
            i = 0
            for cls in range(max(prof.layer_class) + 1):
                layers = [layer for layer in range(lo, hi) if prof.layer_class[layer] == cls]
                if not layers:
                    continue
                counts = (choice[i], choice[i + 1]) if choice else (0, 0)
                i += 2
                for j, kind in enumerate(KINDS):
                    replicated.update((kind, layer) for layer in layers[counts[j]:])
            if hi == prof.num_layers and len(choice) > i:
                head_vp = bool(choice[i])
        return self.price(t, pp, cuts, sorted(replicated) if t > 1 else [], head_vp)

    def price(self, t: int, pp: int, cuts=None, replicated=(), vocab_parallel_head: bool = False) -> Plan:
        """The plan of these choices, priced (``cuts`` default: as even as the layers allow;
        ``replicated``: blocks ``(kind, layer)`` kept whole; the rest of the blocks sharded ``t``
        ways where ``t`` divides them)."""
        from orca_compile.passes.partition.pipeline_split import even_cuts

        prof = self.profile
        if t not in prof.parts:
            raise ValueError(f"tensor_parallel_size={t} divides none of the model's head or feature counts "
                             f"(possible: {prof.tensor_parallel_sizes})")
        cuts = list(cuts) if cuts else even_cuts(prof.num_layers, pp)
        ok = prof.shardable[t]
        if vocab_parallel_head and not ok["head"]:
            raise ValueError(f"tensor_parallel_size={t} does not divide the vocabulary: the head cannot be "
                             "vocab-parallel")
        whole = {(k, int(layer)) for k, layer in replicated}
        whole |= {(k, layer) for k in KINDS if not ok[k] for layer in range(prof.num_layers)} if t > 1 else set()
        stage_seconds = {k: [] for k in self.iterations}
        memory = []
        depth = pp if self.objective == "throughput" else 1  # iterations in flight
        held = self.workload.batch_size * self.workload.context_len
        for s in range(pp):
            lo, hi = cuts[s], cuts[s + 1]
            secs = {k: 0.0 for k in self.iterations}
            weights = kv = 0.0
            prelude_ids = set()
            for layer in range(lo, hi):
                cls = prof.layer_class[layer]
                for k in self.iterations:
                    secs[k] += self._price(t, (cls, "rest"), k, depth)
                weights += self._memory(t, (cls, "rest"))[0]
                for kind in KINDS:
                    degree = 1 if (kind, layer) in whole else t
                    for k in self.iterations:
                        secs[k] += self._price(degree, (cls, kind), k, depth)
                    w, per_token = self._memory(degree, (cls, kind))
                    weights += w
                    kv += per_token * held
            if lo == 0:
                for k in self.iterations:
                    secs[k] += self._price(1, "prelude", k, depth)
                weights += self._memory(1, "prelude")[0]
                prelude_ids = set(prof.parts[1].prelude.weights)
            if hi == prof.num_layers:
                degree = t if vocab_parallel_head else 1
                for k in self.iterations:
                    secs[k] += self._price(1, "epilogue", k, depth) + self._price(degree, "head", k, depth)
                head = prof.parts[degree].head
                weights += self._memory(1, "epilogue")[0]
                if head is not None:
                    weights += sum(b for i_, b in head.weights.items() if degree > 1 or i_ not in prelude_ids)
            for k in self.iterations:
                stage_seconds[k].append(secs[k])
            memory.append({"weights": weights, "kv_cache": kv, "total": weights + kv})
        return Plan(t, pp, list(cuts), sorted(whole) if t > 1 else [], bool(vocab_parallel_head), self.objective,
                    stage_seconds, {k: self._boundary(t, pp, k, depth) for k in self.iterations}, memory,
                    self.cluster.memory_bytes, self.workload, {k: self.iteration(k, depth) for k in self.iterations})

    def plans(self, devices: int | None = None) -> list[Plan]:
        """The best plan of every (tp, pp) on at most ``devices`` devices (default: the cluster's),
        best first by the objective; plans over the latency bound last."""
        devices = devices or self.cluster.num_devices
        if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
            raise ValueError(f"devices must be an integer >= 1, got {devices!r}")
        if devices > self.cluster.num_devices:
            raise ValueError(f"{devices} devices asked for, the cluster has {self.cluster.num_devices}")
        out = []
        for t in self.profile.tensor_parallel_sizes:
            for pp in range(1, devices // t + 1):
                plan = self.best(t, pp)
                if plan is not None:
                    out.append(plan)
        return rank_plans(out, self.kind, self.latency_bound)


def rank_plans(plans: list[Plan], kind: str = "decode", latency_bound: float | None = None) -> list[Plan]:
    """Best first by each plan's objective on iteration ``kind``; plans over the latency bound
    last; fewer devices first among equals."""
    def order(p: Plan):
        late = latency_bound is not None and p.iteration_seconds(kind) > latency_bound
        return (late, p.iteration_seconds(kind) if p.objective == "latency" else -p.tokens_per_second(kind),
                p.num_devices)
    return sorted(plans, key=order)


def choose(profile: ModelProfile, cluster: Cluster, devices: int | None = None, **options) -> list[Plan]:
    """``Planner(profile, cluster, **options).plans(devices)``, or a ``ValueError`` when no plan
    fits (the model's weights and KV cache exceed the devices' memory)."""
    plans = Planner(profile, cluster, **options).plans(devices)
    if not plans:
        raise ValueError(f"no plan fits {devices or cluster.num_devices} devices of "
                         f"{cluster.device_memory_gib:g} GiB ({cluster.memory_utilization:.0%} usable): the weights "
                         "and the KV cache of the workload do not fit; add devices or shrink the workload")
    return plans
