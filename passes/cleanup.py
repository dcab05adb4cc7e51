"""cleanup: drop what the rewrites left dead or redundant.

Requires: nothing (safe after any pass). Ensures: no dead node (every non-output node is used or
impure, e.g. ``orca.attention``, which writes the cache); no ``squeeze(unsqueeze(x, d), d)``, no
``transpose(transpose(x, a, b), a, b)``, no identity cast, ``alias``, inactive ``dropout`` or multiplication by 1; the
graph lints. HF's mask-building subgraph, dead since ``split_attention``, is gone.

Before / after (the attention output of one layer)::

    transpose_11: f32[4, T, 16] = aten.transpose.int(attention, 0, 1)
    transpose_3: f32[T, 4, 16] = aten.transpose.int(transpose_11, 0, 1)
    reshape: f32[T, 64] = aten.reshape(transpose_3, [sym_size_T, -1])
  ->
    reshape: f32[T, 64] = aten.reshape(attention, [sym_size_T, -1])
"""
from __future__ import annotations

import torch
import torch.fx

from orca_compile.passes.graph_utils import CASTS as _CASTS

aten = torch.ops.aten


def cleanup(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    graph = gm.graph
    changed = True
    while changed:
        changed = False
        for node in list(graph.nodes):
            if node.op != "call_function":
                continue
            if not node.users:
                if node.target is aten.dropout.default and _identity_of(node) is not None:
                    graph.erase_node(node)  # DCE keeps it: dropout is a random (impure) op
                    changed = True
                continue
            same = _identity_of(node)
            if same is not None and _same_meta(same, node):
                node.replace_all_uses_with(same)
                changed = True
        graph.eliminate_dead_code()
    _postcondition(gm)
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _identity_of(node):
    """The node this one equals (value and layout-insensitive uses), or None."""
    t, args = node.target, node.args
    src = args[0] if args else None
    if not isinstance(src, torch.fx.Node):
        return None
    if t is aten.squeeze.dim and src.target is aten.unsqueeze.default and _dim(args[1], node, 1) == _dim(src.args[1], src):
        return src.args[0]
    if t is aten.transpose.int and src.target is aten.transpose.int and _pair(node) == _pair(src):
        return src.args[0]
    if t is aten.alias.default:
        return src
    if t in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        return src  # kept only if the shapes match (a reshape to the same shape is a no-op)
    if t is aten.dropout.default and (args[1] == 0 or not args[2]):
        return src
    if t in _CASTS and "copy" not in node.kwargs:
        return src
    if t in (aten.mul.Tensor, aten.div.Tensor) and len(args) == 2 and type(args[1]) in (int, float) and args[1] == 1:
        return src  # x * 1 is x exactly (HF's rotary attention_scaling of 1.0)
    return None


def _dim(d, node, extra=0):
    rank = node.meta["val"].dim() + extra
    return d % rank


def _pair(node):
    rank = node.meta["val"].dim()
    return sorted(d % rank for d in node.args[1:3])


def _same_meta(a, b):
    va, vb = a.meta.get("val"), b.meta.get("val")
    return (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.dtype == vb.dtype
            and va.device == vb.device and va.shape == vb.shape)


def _postcondition(gm):
    for node in gm.graph.nodes:
        if node.op in ("call_function", "get_attr") and not node.users and not node.is_impure():
            raise AssertionError(f"cleanup: {node.name} is dead")
    gm.graph.lint()
