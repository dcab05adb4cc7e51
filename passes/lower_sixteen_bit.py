"""The 16-bit parts of ``lower_linears`` (``passes/lower_cpu.py``), for a float32 graph widened
from a 16-bit checkpoint (``orca_compile/sixteen_bit.py`` chooses the path):

* which path the graph is on: ``matmul_dtype`` (``CaptureInfo.matmul_dtype`` set: the linears
  multiply in 16 bits on oneDNN, a CPU with 16-bit matrix units) or ``weight_storage`` (float32
  arithmetic, the C GEMM keeping the weights in 16 bits); ``exact_in`` keeps a weight in 16 bits
  only where that dtype holds it exactly, so the lowering never rounds a weight;
* on the 16-bit-multiply path each linear is ``_to_copy(x, 16-bit) -> mkldnn._linear_pointwise ->
  _to_copy(float32)``, the input cast made once for all the linears that read it (``cast_once``);
  at a decode step's few rows its cost is the weight stream plus ~10-20 us for each call the graph
  makes (``benchmarks/decode_ab.py gemms``: W2's decode step at 8 rows spends 9.6 ms on its 591
  calls besides the GEMMs, docs/benchmarks.md);
* on both paths the embedding tables are gathered from a 16-bit copy (``narrow_embeddings``).

``multiply_in_sixteen_bits`` (after the linears are lowered): ``mul(widen(a16), widen(b16))`` read
by a narrowing cast alone (the gated MLP's ``act(gate) * up`` feeding ``down``) becomes
``mul(a16, b16)``, bit for bit the same: ATen's 16-bit ``mul`` on the CPU widens both operands,
multiplies in float32 and rounds the product to the 16-bit dtype (nearest even), which is what the
casts around the float32 ``mul`` did (an implementation fact, not IEEE's: checked over the whole
range, extremes and NaN included, by ``tests/passes/test_lower_sixteen_bit.py``; the product of
two 16-bit significands is exact in float32 except where it leaves float32's normal range, and
both forms round the same float32 product there too); three calls fewer per layer and half the
bytes. W2's decode forward: 0.970x the time at
the median of 60 pairs, p = 0.002 (``benchmarks/decode_ab.py products``; docs/benchmarks.md).

Tried and removed: the linears reading one input (Q, K, V) as one GEMM on their stacked weights,
split after. It saves two GEMM calls and two casts a layer but adds a split and its three
results, and oneDNN then sums the columns in another order (the logits move by float32 rounding);
its A/B on W2's decode forward was 0.997x (p = 0.27, inside the spread).

Requires (``multiply_in_sixteen_bits``): the graph ``lower_linears`` is lowering, its linears
already ``mkldnn._linear_pointwise``. Ensures: ``lower_cpu.check_linears`` checks that every oneDNN
linear reads its packed weight's dtype; the product rewrite has nothing more to check (each
rewrite keeps the values bit for bit), and it may be switched off (``benchmarks/decode_ab.py``
does, for its A/B), so what it leaves is no postcondition of the lowering.
"""
from __future__ import annotations

import logging

import torch
import torch.fx

from orca_compile.kernels import gemm_cpu
from orca_compile.passes.graph_utils import dtype_cast, fetch_attr

log = logging.getLogger(__name__)
aten = torch.ops.aten


def matmul_dtype(gm: torch.fx.GraphModule) -> torch.dtype | None:
    """The 16-bit dtype a float32 graph's linears multiply in on oneDNN (``CaptureInfo.matmul_dtype``,
    set by ``compile`` for a 16-bit checkpoint on a CPU with 16-bit matrix units), else None."""
    return getattr(gm.meta.get("orca"), "matmul_dtype", None)


def weight_storage(gm: torch.fx.GraphModule, kernel: str) -> torch.dtype | None:
    """The 16-bit dtype the C GEMM keeps a float32 graph's linear weights in (``CaptureInfo.weight_storage``,
    set by ``compile`` for a 16-bit checkpoint) when they multiply in float32, if it takes that
    dtype; else None (float32, and the log says why where a 16-bit dtype was asked for)."""
    info = gm.meta.get("orca")
    storage = getattr(info, "weight_storage", None)
    if storage is None or matmul_dtype(gm) is not None:
        return None
    if kernel != "orca":
        log.warning("%s weights run as float32 weights on oneDNN (twice the bytes a decode streams); the cpu "
                    "backend keeps them in 16 bits", storage)
        return None
    if not gemm_cpu.supports(storage):
        log.warning("this build of the C GEMM takes no %s weights (the C compiler lacks _Float16): they run as "
                    "float32 weights (twice the bytes a decode streams)", storage)
        return None
    return storage


def cast_once(graph, casts: dict, x: torch.fx.Node, dtype: torch.dtype) -> torch.fx.Node:
    """One ``dtype`` copy of the activation ``x`` for every native linear that reads it (Q, K and V
    share theirs), made right after ``x`` so that it precedes them all."""
    if x not in casts:
        with graph.inserting_after(x):
            cast = graph.call_function(aten._to_copy.default, (x,), {"dtype": dtype})
        cast.meta = {"val": retyped(x.meta.get("val"), dtype)}
        casts[x] = cast
    return casts[x]


def retyped(val, dtype):
    return val.to(dtype) if isinstance(val, torch.Tensor) else val


def exact_in(t: torch.Tensor, storage: torch.dtype | None) -> bool:
    """A float32 tensor whose every value ``storage`` holds exactly: the weights of a 16-bit
    checkpoint read in float32 are, and only those are kept in 16 bits, so that the lowering never
    rounds a weight (a checkpoint may keep some modules in float32)."""
    return (storage is not None and t.dtype == torch.float32
            and torch.equal(t.detach().to(storage).to(torch.float32), t.detach()))


def narrow_embeddings(gm: torch.fx.GraphModule, storage: torch.dtype) -> int:
    """Each ``aten.embedding`` on a float32 weight of the graph that ``storage`` holds exactly
    gathers from a ``storage`` copy of the table and widens the gathered rows: the table is read a
    few rows an iteration, so its float32 copy was only memory (a tied LM head keeps its own packed
    copy). Returns how many tables were narrowed."""
    done: dict[int, str] = {}
    for node in list(gm.graph.find_nodes(op="call_function", target=aten.embedding.default)):
        weight = node.args[0]
        if not (isinstance(weight, torch.fx.Node) and weight.op == "get_attr"):
            continue
        t = fetch_attr(gm, weight.target)
        if id(t) not in done and not exact_in(t, storage):
            continue
        if id(t) not in done:
            name = "_narrow_" + weight.target.replace(".", "_")
            while hasattr(gm, name):
                name += "_"
            gm.register_buffer(name, t.detach().to(storage), persistent=False)
            done[id(t)] = name
        with gm.graph.inserting_before(node):
            table = gm.graph.get_attr(done[id(t)])
            gathered = gm.graph.call_function(aten.embedding.default, (table, *node.args[1:]), dict(node.kwargs))
            widened = gm.graph.call_function(aten._to_copy.default, (gathered,), {"dtype": torch.float32})
        gathered.meta = {"val": node.meta["val"].to(storage)} if "val" in node.meta else {}
        widened.meta = dict(node.meta)
        node.replace_all_uses_with(widened)
        gm.graph.erase_node(node)
    return len(done)


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
