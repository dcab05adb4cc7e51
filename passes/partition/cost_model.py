"""FLOPs of a rewritten graph, read off the graph itself as sympy expressions.

Every matmul node costs ``2 * numel(output) * K``: ATen's (``aten.linear``, ``addmm``, ``mm``,
``bmm``, ``matmul``) and the CPU lowering's (the C GEMM's ``gemm_cpu.linear``, oneDNN's packed
linear), so any stage of the graph, lowered or not, is priced by the same rule and gives the same
total. Shapes are symbolic in ``T`` (tokens of the iteration) and ``N`` (rows whose logits are
computed), so one expression prices any iteration. Attention (``orca::attention``, or the C call
the lowering put in its place) depends on each token's context rather than on ``T`` alone and is
priced per (query, visible key) pair.

Bytes and communication, for the planner: the weights the matmuls read (each tensor once, every
iteration), every op's output (written, then read), the K/V of each cached token (read once per
request per iteration), and the bytes each ``orca::all_reduce`` sums. ``predict_seconds`` turns
them into an iteration time on a ``Machine`` (a roofline of compute and memory, plus ring
all-reduces over the link, plus a launch cost per op).
"""
from __future__ import annotations

import dataclasses

import sympy
import torch
import torch.fx

from orca_compile.kernels import attention_cpu, gemm_cpu
from orca_compile.ops import ALL_REDUCE, ATTENTION, EXPERT_LINEAR
from orca_compile.passes.graph_utils import fetch_attr

# which argument is the left operand (addmm's first argument is the bias), whose last dim is K
_MATMULS = {torch.ops.aten.linear.default: 0, torch.ops.aten.addmm.default: 1, torch.ops.aten.mm.default: 0,
            torch.ops.aten.bmm.default: 0, torch.ops.aten.matmul.default: 0,
            gemm_cpu.linear: 0, torch.ops.mkldnn._linear_pointwise.default: 0,
            # the experts of a mixture-of-experts layer: [T, k, N] outputs, each a row of K; their
            # weights count whole (every expert read), which overstates a decode of few tokens
            EXPERT_LINEAR: 0}
_ATTENTION = (ATTENTION, attention_cpu.attention)


def _expr(dim) -> sympy.Expr:
    return dim.node.expr if isinstance(dim, torch.SymInt) else sympy.Integer(int(dim))


@dataclasses.dataclass(frozen=True)
class Machine:
    """What one device does per second, and its link to the others: the planner's parameters,
    measured on this machine (``measure_machine``) or given for a cluster it is not."""

    flops_per_second: float  # dense matmul rate in the model's dtype
    memory_bytes_per_second: float  # streaming read rate of the device's memory
    link_bytes_per_second: float = 0.0  # all-reduce bus bandwidth between the ranks (0: one device)
    link_latency_seconds: float = 0.0  # per collective step
    op_overhead_seconds: float = 0.0  # launching one op of the graph (Python, dispatch, a kernel call)


@dataclasses.dataclass
class GraphCost:
    matmul_flops: sympy.Expr  # in the symbols below
    tokens: sympy.Symbol  # T
    logits_rows: sympy.Symbol | None  # N
    attention_flops_per_key: int  # per (query token, visible key) pair, summed over layers
    weight_bytes: int = 0  # the matmuls' weights, read in full every iteration
    activation_bytes: sympy.Expr = sympy.Integer(0)  # every op's output, written once (and read once)
    attention_bytes_per_key: int = 0  # K and V of one cached token, summed over layers (read per request)
    comm_bytes: sympy.Expr = sympy.Integer(0)  # what the all-reduces sum, per rank
    num_collectives: int = 0
    num_ops: int = 0
    world_size: int = 1  # ranks the all-reduces span

    def _subs(self, num_tokens, num_logits_rows):
        subs = {self.tokens: num_tokens}
        if self.logits_rows is not None:
            subs[self.logits_rows] = num_logits_rows
        return subs

    def flops(self, num_tokens: int, num_logits_rows: int, num_query_key_pairs: int) -> float:
        subs = self._subs(num_tokens, num_logits_rows)
        return float(self.matmul_flops.subs(subs)) + self.attention_flops_per_key * num_query_key_pairs

    def predict_seconds(self, machine: Machine, num_tokens: int, num_logits_rows: int, num_query_key_pairs: int,
                        num_context_tokens: int) -> dict[str, float]:
        """One iteration's predicted time on ``machine``, by parts: ``compute`` (FLOPs at the
        matmul rate), ``memory`` (the weights, the context's K/V and the activations at the memory
        rate), their roofline ``max``, ``communication`` (ring all-reduces: ``2 (p - 1) / p`` of the
        bytes over the link, ``2 (p - 1)`` latencies each), ``overhead`` (a launch per op) and
        ``total``. ``num_context_tokens``: cached + new tokens of every request in the batch."""
        subs = self._subs(num_tokens, num_logits_rows)
        compute = self.flops(num_tokens, num_logits_rows, num_query_key_pairs) / machine.flops_per_second
        memory = (self.weight_bytes + self.attention_bytes_per_key * num_context_tokens
                  + 2 * float(self.activation_bytes.subs(subs))) / machine.memory_bytes_per_second
        comm = 0.0
        p = self.world_size
        if self.num_collectives and p > 1:
            if machine.link_bytes_per_second <= 0:
                raise ValueError("this graph all-reduces across ranks: the machine needs link_bytes_per_second > 0")
            comm = (2 * (p - 1) / p * float(self.comm_bytes.subs(subs)) / machine.link_bytes_per_second
                    + self.num_collectives * 2 * (p - 1) * machine.link_latency_seconds)
        overhead = self.num_ops * machine.op_overhead_seconds
        roof = max(compute, memory)
        return {"compute": compute, "memory": memory, "roofline": roof, "communication": comm,
                "overhead": overhead, "total": roof + comm + overhead}


@dataclasses.dataclass
class PartCost:
    """The cost of one part of a graph (a layer's attention or MLP block, the rest of a layer,
    the prelude, the LM head): the planner prices each part for itself, sharded or whole."""

    matmul_flops: sympy.Expr = sympy.Integer(0)  # in T and N
    weights: dict = dataclasses.field(default_factory=dict)  # id(tensor) -> bytes held (a tied weight: one id)
    streamed: dict = dataclasses.field(default_factory=dict)  # the matmuls' weights: read in full each iteration
    activation_bytes: sympy.Expr = sympy.Integer(0)
    comm_bytes: sympy.Expr = sympy.Integer(0)  # all-reduced, per rank
    gather_bytes: sympy.Expr = sympy.Integer(0)  # all-gathered: one rank's part
    num_collectives: int = 0
    num_ops: int = 0
    attention_flops_per_key: int = 0
    kv_bytes_per_token: int = 0
    sliding_window: int = 0

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())


def part_costs(gm: torch.fx.GraphModule, part_of) -> tuple[dict, sympy.Symbol, sympy.Symbol | None]:
    """``{part: PartCost}`` of ``gm``'s calls grouped by ``part_of(node)`` (any hashable; None:
    left out), with the graph's ``T`` and ``N`` symbols. The parts' sums are ``graph_cost``'s."""
    from orca_compile.ops import ALL_GATHER

    parts: dict = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        key = part_of(node)
        if key is None:
            continue
        part = parts.setdefault(key, PartCost())
        part.num_ops += 1
        val = node.meta.get("val")
        if node.target is ALL_REDUCE:
            part.comm_bytes += _bytes(val)
            part.num_collectives += 1
        if node.target is ALL_GATHER:
            part.gather_bytes += _bytes(node.args[0].meta["val"])
            part.num_collectives += 1
        if node.target in _ATTENTION:
            q, k, v = (a.meta["val"] for a in node.args[:3])
            hd, vd = int(q.shape[2]), int(v.shape[2])
            part.attention_flops_per_key += 2 * int(q.shape[1]) * (hd + vd)
            part.kv_bytes_per_token += int(k.shape[1]) * (hd + vd) * k.element_size()
            part.sliding_window = int(node.args[10]) if len(node.args) > 10 else 0
        else:
            part.activation_bytes += _bytes(val)
        for arg in node.all_input_nodes:  # every tensor the part holds (an embedding's table too)
            if arg.op == "get_attr":
                t = fetch_attr(gm, arg.target)
                if isinstance(t, torch.Tensor):
                    part.weights[id(t)] = t.numel() * t.element_size()
                    if node.target in _MATMULS:
                        part.streamed[id(t)] = t.numel() * t.element_size()
        if node.target in _MATMULS:
            k = _expr(node.args[_MATMULS[node.target]].meta["val"].shape[-1])
            part.matmul_flops += 2 * _numel(val) * k
    placeholders = {n.target: n for n in gm.graph.find_nodes(op="placeholder")}
    tokens = _expr(placeholders["input_ids"].meta["val"].shape[0]) if "input_ids" in placeholders else \
        _expr(placeholders["hidden"].meta["val"].shape[0])
    rows = placeholders.get("logits_indices")
    rows = _expr(rows.meta["val"].shape[0]) if rows is not None else None
    return parts, tokens, rows if isinstance(rows, sympy.Symbol) else None


def _numel(val) -> sympy.Expr:
    numel = sympy.Integer(1)
    for d in val.shape:
        numel *= _expr(d)
    return numel


def _bytes(val) -> sympy.Expr:
    if isinstance(val, torch.Tensor):
        return _numel(val) * val.element_size()
    if isinstance(val, (tuple, list)):
        return sum((_bytes(v) for v in val), sympy.Integer(0))
    return sympy.Integer(0)


def graph_cost(gm: torch.fx.GraphModule) -> GraphCost:
    total = sympy.Integer(0)
    weights: dict[int, int] = {}
    activations = sympy.Integer(0)
    comm = sympy.Integer(0)
    collectives = ops = 0
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        ops += 1
        val = node.meta.get("val")
        if node.target is ALL_REDUCE:
            comm += _bytes(val)
            collectives += 1
        if node.target not in _ATTENTION:  # attention's output is counted; its cache reads below
            activations += _bytes(val)
        if node.target not in _MATMULS:
            continue
        k = _expr(node.args[_MATMULS[node.target]].meta["val"].shape[-1])
        total += 2 * _numel(val) * k
        for arg in node.all_input_nodes:
            if arg.op == "get_attr":
                t = fetch_attr(gm, arg.target)
                if isinstance(t, torch.Tensor):
                    weights[id(t)] = t.numel() * t.element_size()
    placeholders = {n.target: n for n in gm.graph.find_nodes(op="placeholder")}
    tokens = _expr(placeholders["input_ids"].meta["val"].shape[0])
    rows = placeholders.get("logits_indices")
    rows = _expr(rows.meta["val"].shape[0]) if rows is not None else None
    per_key = kv_per_key = 0
    for node in (n for n in gm.graph.nodes if n.op == "call_function" and n.target in _ATTENTION):
        q, k, v = (a.meta["val"] for a in node.args[:3])
        num_heads, head_dim, v_head_dim = int(q.shape[1]), int(q.shape[2]), int(v.shape[2])
        per_key += 2 * num_heads * (head_dim + v_head_dim)  # q.k and p.v
        kv_per_key += int(k.shape[1]) * (head_dim + v_head_dim) * k.element_size()
    world = int((gm.meta.get("orca_partition") or {}).get("tensor_parallel_size", 1))
    return GraphCost(sympy.expand(total), tokens, rows if isinstance(rows, sympy.Symbol) else None, per_key,
                     weight_bytes=sum(weights.values()), activation_bytes=sympy.expand(activations),
                     attention_bytes_per_key=kv_per_key, comm_bytes=sympy.expand(comm), num_collectives=collectives,
                     num_ops=ops, world_size=world)

