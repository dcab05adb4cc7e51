"""fuse_norms: each layer norm over the last dim, with the residual add that feeds it, becomes one
call of the C kernel ``kernels/norm_cpu`` (a pass of the ``cpu`` backend's lowering).

Recognised: ``aten.layer_norm`` over the last dim only, weight and bias ``[n]`` weights of the
graph or absent, with or without the ``add`` in front -> ``norm_cpu.add_layer_norm(x, r, w, b,
eps, reuse)``. The add is fused where it has two tensor operands of its own shape and dtype (no
broadcast, no alpha); the call's results are ``(s, y)``: the residual stream and the norm.
``reuse`` is True where both operands die at the add (``dies_at``: read by it alone, memory of
their own): the kernel then writes ``s`` and ``y`` over them, so a decode step's norms write into
lines that are in cache, not into fresh allocations.

HF's RMSNorm (Llama, Qwen2, Mistral) was fused the same way until its A/B on a Llama-shaped W1
showed no gain beyond the run-to-run spread (docs/benchmarks.md); its ATen ops stay as they are.

Requires: a graph with ``meta["val"]`` on its nodes; the C norm kernel available (else the
graph is returned as it is). Ensures (``check``): a norm written in place is the last reader of
both operands.

Before / after (GPT-2's second norm of a layer)::

    add_3 = aten.add.Tensor(add_1, linear_1)
    layer_norm_1 = aten.layer_norm(add_3, [768], ln_2_weight, ln_2_bias, 1e-05)
  ->
    add_layer_norm = orca_compile.kernels.norm_cpu.add_layer_norm(add_1, linear_1, ln_2_weight,
                                                                  ln_2_bias, 1e-05, True)
    getitem = add_layer_norm[0]      # the residual stream (add_3's readers)
    getitem_1 = add_layer_norm[1]    # the norm (layer_norm_1's readers)
"""
from __future__ import annotations

import operator

import torch
import torch.fx

from orca_compile.kernels import gemm_cpu, norm_cpu
from orca_compile.passes.graph_utils import fetch_attr

aten = torch.ops.aten
KERNELS = (norm_cpu.add_layer_norm,)
_REUSE_ARG = {norm_cpu.add_layer_norm: 5}  # where the call's ``reuse`` flag sits


def fuse_norms(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Rewrite ``gm``'s graph in place and return it; the counts go to ``gm.meta["orca_lowering"]``:
    ``fused_norms`` and, of those, ``norms_in_place`` (written over their operands). A graph
    without the kernel available is returned as it is."""
    counts = _fuse(gm) if norm_cpu.available() else {"layer_norms": 0, "in_place": 0}
    gm.meta.setdefault("orca_lowering", {}).update(fused_norms=counts["layer_norms"],
                                                   norms_in_place=counts["in_place"])
    check(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def _fuse(gm: torch.fx.GraphModule) -> dict[str, int]:
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    counts = {"layer_norms": 0, "in_place": 0}
    for node in list(graph.find_nodes(op="call_function", target=aten.layer_norm.default)):
        # matched when its turn comes: an earlier rewrite may have replaced its input (GPT-NeoX's
        # two norms read one residual sum; the first takes the add, the second reads its result)
        match = _layer_norm(gm, node)
        if match is None:
            continue
        kernel, s_node, y_node, dead, w, b, eps = match
        val = s_node.meta["val"]
        add = s_node if _plain_add(s_node, val) else None
        anchor = add if add is not None else dead[0]
        if any(isinstance(p, torch.fx.Node) and order[p] > order[anchor] for p in (w, b)):
            continue
        operands = tuple(add.args) if add is not None else (s_node, None)
        reuse = add is not None and all(dies_at(o, add) for o in operands)
        args = operands + (w, b, float(eps), reuse)
        with graph.inserting_before(anchor):
            fused = graph.call_function(kernel, args)
            s = graph.call_function(operator.getitem, (fused, 0))
            y = graph.call_function(operator.getitem, (fused, 1))
        s.meta = dict(add.meta) if add is not None else {"val": val}
        y.meta = dict(y_node.meta)
        fused.meta = {"val": (s.meta.get("val"), y.meta.get("val"))}
        y_node.replace_all_uses_with(y)
        for node in reversed(dead):  # the norm's own nodes, each read by the next alone
            graph.erase_node(node)
        if add is not None:
            add.replace_all_uses_with(s)
            graph.erase_node(add)
        counts["layer_norms"] += 1
        counts["in_place"] += reuse
    return counts


def check(gm: torch.fx.GraphModule) -> None:
    """A norm written in place must be the last reader of both operands: anything else reading
    one would see the norm's results instead."""
    shared = [n.name for n in gm.graph.nodes if n.op == "call_function" and n.target in _REUSE_ARG
              and len(n.args) > _REUSE_ARG[n.target] and n.args[_REUSE_ARG[n.target]]
              and any(not dies_at(o, n) for o in n.args[:2])]
    if shared:
        raise AssertionError(f"fuse_norms: norms written over operands that are read elsewhere: {shared}")


def dies_at(node, user) -> bool:
    """``node``'s value is read by ``user`` alone and is memory of its own: the result of a kernel
    call (the C linear, a result of a fused norm) or of an ATen op whose schema returns new memory
    (no view or alias of an input, a weight or a graph input)."""
    if not isinstance(node, torch.fx.Node) or list(node.users) != [user]:
        return False
    t = node.target
    if t is gemm_cpu.linear:
        return True
    if t is operator.getitem:
        src = node.args[0]
        return isinstance(src, torch.fx.Node) and src.op == "call_function" and src.target in KERNELS
    if isinstance(t, torch._ops.OpOverload):
        schema = t._schema
        return not schema.is_mutable and all(ret.alias_info is None for ret in schema.returns)
    return False


# ---- matching: (kernel, s, the node whose value is y, the norm's nodes in graph order, w, b, eps) or None

def _layer_norm(gm, ln):
    if ln.kwargs or len(ln.args) < 2:
        return None
    x, shape, w, b, eps = (list(ln.args) + [None, None, 1e-5])[:5]
    val = _rows_val(x)
    if val is None or list(shape) != [val.shape[-1]] or not isinstance(eps, (int, float)):
        return None
    if not all(p is None or _param(gm, p, val.shape[-1], val.dtype) for p in (w, b)):
        return None
    return norm_cpu.add_layer_norm, x, ln, [ln], w, b, eps


def _rows_val(x):
    """``x``'s value when it is a CPU tensor the kernel takes, else None."""
    val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
    if (not isinstance(val, torch.Tensor) or val.dtype not in norm_cpu.DTYPES or val.device.type != "cpu"
            or val.dim() == 0):
        return None
    return val


def _is(node, *targets) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def _plain_add(node, val) -> bool:
    if not (_is(node, aten.add.Tensor) and len(node.args) == 2 and not node.kwargs):
        return False
    vals = [a.meta.get("val") if isinstance(a, torch.fx.Node) else None for a in node.args]
    return all(v is not None and v.shape == val.shape and v.dtype == val.dtype for v in vals)


def _param(gm, node, n, dtype) -> bool:
    t = fetch_attr(gm, node.target) if isinstance(node, torch.fx.Node) and node.op == "get_attr" else None
    return isinstance(t, torch.Tensor) and t.shape == (n,) and t.dtype == dtype and t.device.type == "cpu"
