"""A graph rewrite of ``lower_linears`` for the 16-bit-multiply path (``CaptureInfo.matmul_dtype``
set: a 16-bit checkpoint on a CPU with 16-bit matrix units, ``orca_compile/sixteen_bit.py``).
There each linear is ``_to_copy(x, 16-bit) -> mkldnn._linear_pointwise -> _to_copy(float32)``; at
a decode step's few rows its cost is the weight stream plus ~10-20 us for each call the graph
makes (``benchmarks/decode_ab.py gemms``: W2's decode step at 8 rows spends 9.6 ms on its 591
calls besides the GEMMs, docs/benchmarks.md).

``multiply_in_sixteen_bits`` (after the linears are lowered): ``mul(widen(a16), widen(b16))`` read
by a narrowing cast alone (the gated MLP's ``act(gate) * up`` feeding ``down``) becomes
``mul(a16, b16)``, bit for bit the same: ATen's 16-bit ``mul`` on the CPU widens both operands,
multiplies in float32 and rounds the product to the 16-bit dtype (nearest even), which is what the
casts around the float32 ``mul`` did (an implementation fact, not IEEE's: checked over the whole
range, extremes and NaN included, by ``tests/passes/test_lower_sixteen_bit.py``; the product of
two 16-bit significands is exact in float32 except where it leaves float32's normal range, and
both forms round the same float32 product there too); three calls fewer per layer and half the
bytes. W2's decode forward: 0.973x the time at
the median of 40 pairs (``benchmarks/decode_ab.py products``; docs/benchmarks.md).

Tried and removed: the linears reading one input (Q, K, V) as one GEMM on their stacked weights,
split after. It saves two GEMM calls and two casts a layer but adds a split and its three
results, and oneDNN then sums the columns in another order (the logits move by float32 rounding);
its A/B on W2's decode forward was 0.997x (p = 0.27, inside the spread).

Requires: the graph ``lower_linears`` is lowering, its linears already ``mkldnn._linear_pointwise``.
Ensures: nothing to check beyond what it rewrites (each rewrite keeps the values bit for bit); it
may be switched off (``benchmarks/decode_ab.py`` does, for its A/B), so what it leaves is no
postcondition of the lowering.
"""
from __future__ import annotations

import torch
import torch.fx

from orca_compile.passes.graph_utils import dtype_cast

aten = torch.ops.aten


def multiply_in_sixteen_bits(gm: torch.fx.GraphModule) -> int:
    """Rewrite each ``_to_copy(mul(_to_copy(a16, f32), _to_copy(b16, f32)), 16-bit)`` (every link
    read by the next alone, ``a16`` and ``b16`` of the narrow dtype) as ``mul(a16, b16)``; returns
    how many."""
    graph = gm.graph
    count = 0
    for mul in list(graph.find_nodes(op="call_function", target=aten.mul.Tensor)):
        if len(mul.args) != 2 or mul.kwargs or len(mul.users) != 1:
            continue
        narrow = next(iter(mul.users))
        dtype = dtype_cast(narrow)
        if dtype not in (torch.bfloat16, torch.float16):
            continue
        widen = mul.args
        if not all(dtype_cast(w) == torch.float32 and list(w.users) == [mul] and _dtype(w.args[0]) == dtype
                   for w in widen):
            continue
        with graph.inserting_before(mul):
            product = graph.call_function(aten.mul.Tensor, tuple(w.args[0] for w in widen))
        product.meta = dict(mul.meta, val=narrow.meta.get("val"))
        narrow.replace_all_uses_with(product)
        graph.erase_node(narrow)
        graph.erase_node(mul)
        for w in dict.fromkeys(widen):
            graph.erase_node(w)
        count += 1
    return count


def _dtype(node):
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return val.dtype if isinstance(val, torch.Tensor) else None
