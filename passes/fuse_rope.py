"""fuse_rope: HF's rotary embedding, ``x * cos + rotate_half(x) * sin``, becomes one call of the C
kernel ``kernels/rope_cpu.rotate`` (part of ``lower_cpu``, ``kernel="orca"``).

Matched (per query or key, ``x`` ``[H, T, D]``, ``h = D / 2``)::

    a = mul(x, cos)                       # cos, sin: [1, T, D] or [T, D]
    x1 = slice(x, -1, 0, h); x2 = slice(x, -1, h, end)
    r = cat([neg(x2), x1], -1)            # rotate_half(x)
    y = add(a, mul(r, sin))               # either operand order in each mul and the add

with every intermediate read by the next alone (``x``, ``cos`` and ``sin`` may have other readers:
the key's rotation shares them with the query's). Seven ATen ops and three temporaries the size
of ``x`` become one call that reads ``x`` once and writes ``y`` laid out as ``x`` (for the view
of a ``[T, H * D]`` projection: ``[T, H, D]`` rows), which is what ATen's ``add`` leaves in HF's
operand order, so the transpose in front of attention stays contiguous.

Requires: ``meta["val"]`` on the nodes; the C RoPE kernel available. Ensures (``check``): each
fused call's value has its ``x``'s shape and dtype, and its tables are ``[T, D]`` or ``[1, T, D]``
of that dtype; a graph that spells RoPE otherwise keeps its ATen ops (the count says how many
were fused).

Before / after (a Llama layer's query)::

    mul_5 = aten.mul.Tensor(transpose, unsqueeze_13)
    slice_2 = aten.slice.Tensor(transpose, 2, 0, 8, 1)
    slice_3 = aten.slice.Tensor(transpose, 2, 8, 9223372036854775807, 1)
    neg = aten.neg(slice_3)
    cat_1 = aten.cat([neg, slice_2], 2)
    mul_6 = aten.mul.Tensor(cat_1, unsqueeze_14)
    add_3 = aten.add.Tensor(mul_5, mul_6)
  ->
    rotate = orca_compile.kernels.rope_cpu.rotate(transpose, unsqueeze_13, unsqueeze_14)
"""
from __future__ import annotations

import torch
import torch.fx

from orca_compile.kernels import rope_cpu

aten = torch.ops.aten


def fuse_rope(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Rewrite ``gm``'s graph in place and return it; ``gm.meta["orca_lowering"]["fused_rope"]``
    says how many rotations were fused. A graph without the kernel available is returned as it is."""
    count = _fuse(gm) if rope_cpu.available() else 0
    gm.meta.setdefault("orca_lowering", {})["fused_rope"] = count
    check(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def _fuse(gm: torch.fx.GraphModule) -> int:
    graph = gm.graph
    count = 0
    for add in list(graph.find_nodes(op="call_function", target=aten.add.Tensor)):
        match = _match(add)
        if match is None:
            continue
        x, cos, sin, dead = match
        with graph.inserting_before(add):
            fused = graph.call_function(rope_cpu.rotate, (x, cos, sin))
        fused.meta = dict(add.meta)
        add.replace_all_uses_with(fused)
        for node in [add, *dead]:  # users first
            graph.erase_node(node)
        count += 1
    return count


def check(gm: torch.fx.GraphModule) -> None:
    bad = []
    for node in gm.graph.find_nodes(op="call_function", target=rope_cpu.rotate):
        y, (x, cos, sin) = _val(node), node.args
        xv = _val(x)
        if (y is None or xv is None or tuple(y.shape) != tuple(xv.shape) or y.dtype != xv.dtype
                or not (_table(cos, y) and _table(sin, y))):
            bad.append(node.name)
    if bad:
        raise AssertionError(f"fuse_rope: rotations whose operands do not fit their result: {bad}")


def _match(add):
    """(x, cos, sin, the rotation's other nodes, each before its inputs) or None."""
    if len(add.args) != 2 or add.kwargs:
        return None
    y = _val(add)
    if y is None or y.dim() != 3 or y.dtype not in rope_cpu.DTYPES or y.device.type != "cpu" or y.shape[2] % 2:
        return None
    for a, b in (add.args, add.args[::-1]):
        for cat_mul_args in _orders(b):  # b = mul(r, sin)
            r, sin = cat_mul_args
            parts = _rotate_half(r)
            if parts is None:
                continue
            x, neg, x1, x2 = parts
            for xa, cos in _orders(a):  # a = mul(x, cos)
                if xa is not x or not _table(cos, y) or not _table(sin, y):
                    continue
                if _val(x) is None or tuple(_val(x).shape) != tuple(y.shape) or _val(x).dtype != y.dtype:
                    continue
                chain = [a, b, r, neg, x1, x2]
                users = {a: add, b: add, r: b, neg: r}
                if all(list(n.users) == [u] for n, u in users.items()) and list(x1.users) == [r] \
                        and list(x2.users) == [neg]:
                    return x, cos, sin, chain
    return None


def _orders(node):
    """The two operands of a plain ``mul``, in both orders; none for anything else."""
    if not (_is(node, aten.mul.Tensor) and len(node.args) == 2 and not node.kwargs):
        return []
    return [tuple(node.args), tuple(node.args[::-1])]


def _rotate_half(r):
    """``r = cat([neg(x2), x1], -1)`` with x1, x2 the halves of one x: (x, neg, x1, x2) or None."""
    if not (_is(r, aten.cat.default) and not r.kwargs and len(r.args) == 2 and len(r.args[0]) == 2):
        return None
    val = _val(r)
    if val is None or r.args[1] % val.dim() != val.dim() - 1:
        return None
    neg, x1 = r.args[0]
    if not (_is(neg, aten.neg.default) and len(neg.args) == 1):
        return None
    x2 = neg.args[0]
    d = val.shape[-1]
    h1, h2 = _half(x1, d, 0), _half(x2, d, 1)
    if h1 is None or h1 is not h2:
        return None
    return h1, neg, x1, x2


def _half(node, d, which):
    """``node = slice(x, -1, start, end)`` taking half ``which`` of x's last dim (size d): x, or None."""
    if not (_is(node, aten.slice.Tensor) and not node.kwargs and len(node.args) >= 4):
        return None
    x, dim, start, end = node.args[:4]
    step = node.args[4] if len(node.args) > 4 else 1
    start, end = 0 if start is None else start, d if end is None else end  # None: from the start / to the end
    xv = _val(x)
    if (xv is None or xv.shape[-1] != d or not all(isinstance(v, int) for v in (dim, start, end, step))
            or dim % xv.dim() != xv.dim() - 1 or step != 1):
        return None
    want = (0, d // 2) if which == 0 else (d // 2, d)
    return x if (start, min(end, d)) == want else None


def _table(node, y) -> bool:
    """A cos / sin table the kernel reads as [T, D]: [T, D] or [1, T, D], y's dtype."""
    v = _val(node)
    return (v is not None and v.dtype == y.dtype and v.dim() in (2, 3) and tuple(v.shape[-2:]) == tuple(y.shape[1:])
            and (v.dim() == 2 or v.shape[0] == 1))


def _is(node, target) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is target


def _val(node):
    v = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None
