"""FLOPs of a rewritten graph, read off the graph itself as sympy expressions.

Every matmul node costs ``2 * numel(output) * K``: ATen's (``aten.linear``, ``addmm``, ``mm``,
``bmm``, ``matmul``) and the CPU lowering's (the C GEMM's ``gemm_cpu.linear``, oneDNN's packed
linear), so any stage of the graph, lowered or not, is priced by the same rule and gives the same
total. Shapes are symbolic in ``T`` (tokens of the iteration) and ``N`` (rows whose logits are
computed), so one expression prices any iteration. Attention (``orca::attention``, or the C call
the lowering put in its place) depends on each token's context rather than on ``T`` alone and is
priced per (query, visible key) pair. This is the first brick of the planner's cost model
(communication and bytes come with it).
"""
from __future__ import annotations

import dataclasses

import sympy
import torch
import torch.fx

from orca_compile.kernels import attention_cpu, gemm_cpu
from orca_compile.ops import ATTENTION

# which argument is the left operand (addmm's first argument is the bias), whose last dim is K
_MATMULS = {torch.ops.aten.linear.default: 0, torch.ops.aten.addmm.default: 1, torch.ops.aten.mm.default: 0,
            torch.ops.aten.bmm.default: 0, torch.ops.aten.matmul.default: 0,
            gemm_cpu.linear: 0, torch.ops.mkldnn._linear_pointwise.default: 0}
_ATTENTION = (ATTENTION, attention_cpu.attention)


def _expr(dim) -> sympy.Expr:
    return dim.node.expr if isinstance(dim, torch.SymInt) else sympy.Integer(int(dim))


@dataclasses.dataclass
class GraphCost:
    matmul_flops: sympy.Expr  # in the symbols below
    tokens: sympy.Symbol  # T
    logits_rows: sympy.Symbol | None  # N
    attention_flops_per_key: int  # per (query token, visible key) pair, summed over layers

    def flops(self, num_tokens: int, num_logits_rows: int, num_query_key_pairs: int) -> float:
        subs = {self.tokens: num_tokens}
        if self.logits_rows is not None:
            subs[self.logits_rows] = num_logits_rows
        return float(self.matmul_flops.subs(subs)) + self.attention_flops_per_key * num_query_key_pairs


def graph_cost(gm: torch.fx.GraphModule) -> GraphCost:
    total = sympy.Integer(0)
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _MATMULS:  # noqa: SIM102
            continue
        k = _expr(node.args[_MATMULS[node.target]].meta["val"].shape[-1])
        numel = sympy.Integer(1)
        for d in node.meta["val"].shape:
            numel *= _expr(d)
        total += 2 * numel * k
    placeholders = {n.target: n for n in gm.graph.find_nodes(op="placeholder")}
    tokens = _expr(placeholders["input_ids"].meta["val"].shape[0])
    rows = placeholders.get("logits_indices")
    rows = _expr(rows.meta["val"].shape[0]) if rows is not None else None
    per_key = 0
    for node in (n for n in gm.graph.nodes if n.op == "call_function" and n.target in _ATTENTION):
        q, k, v = (a.meta["val"] for a in node.args[:3])
        num_heads, head_dim, v_head_dim = int(q.shape[1]), int(q.shape[2]), int(v.shape[2])
        per_key += 2 * num_heads * (head_dim + v_head_dim)  # q.k and p.v
    return GraphCost(sympy.expand(total), tokens, rows if isinstance(rows, sympy.Symbol) else None, per_key)
