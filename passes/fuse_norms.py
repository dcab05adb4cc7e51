"""fuse_norms: each norm over the last dim, with the residual add that feeds it, becomes one call
of the C kernel ``kernels/norm_cpu`` (a pass of the ``cpu`` backend's lowering).

Two forms are recognised, each with or without the ``add`` in front:

* ``aten.layer_norm`` over the last dim only, weight and bias ``[n]`` weights of the graph or
  absent -> ``norm_cpu.add_layer_norm(x, r, w, b, eps, reuse)``;
* HF's RMSNorm as export spells it in the model's own dtype (Llama, Qwen2, Mistral; the chain
  ``pow(s, 2) -> mean(-1, keepdim) -> add(eps) -> rsqrt -> mul(s, .) -> mul(w, .)``, each link
  read by the next alone) -> ``norm_cpu.add_rms_norm(x, r, w, eps, reuse, out_dtype)``, but only
  on a graph of 16-bit weights (``CaptureInfo.weight_storage``), whether its linears multiply in
  16 bits (``matmul_dtype``, the AMX path) or in float32 on the 16-bit weights (the C GEMM): its
  A/Bs on W2's decode step, both paths, are in docs/benchmarks.md; on a float32 Llama-shaped W1
  the same fusion showed no gain beyond the spread (session 9) and float32 checkpoints keep
  ATen's six ops (not re-measured since; W1 is GPT-2, whose layer norms are fused on every path).
  Where HF computes the norm in float32 for a float64 model, ``s`` is a cast and the chain stays
  as it is (the kernel
  would round otherwise than ATen's float32 ops, which the float64 tests hold HF to); a cast
  that widens a 16-bit tensor in front (the embedding's rows) is fine. Gemma's ``(1 + w)`` scale
  is no graph weight, so its norm is fused without one and the ``mul`` by ``1 + w`` stays. The
  16-bit casts around it are fused too: an add operand that is a 16-bit linear's result widened
  for the add alone is read in 16 bits (the cast goes: the kernel widens it exactly, as the cast
  did), and a norm read by a narrowing cast alone (the input of the next 16-bit linears) is
  stored in that dtype (``out_dtype``; the kernel rounds to nearest even, as the cast did).

The add is fused where it has two tensor operands of its own shape and dtype (no broadcast, no
alpha); the call's results are ``(s, y)``: the residual stream and the norm. ``reuse`` is True
where both operands die at the add (``dies_at``: read by it alone, memory of their own): the
kernel then writes ``s`` and ``y`` over them, so a decode step's norms write into lines that are in
cache, not into fresh allocations.

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

and a Qwen2 layer's second norm on the 16-bit-multiply path::

    _to_copy_5 = aten._to_copy(_linear_pointwise_3, dtype=torch.float32)   # o_proj, widened
    add_5 = aten.add.Tensor(embedding, _to_copy_5)
    pow_2 = aten.pow.Tensor_Scalar(add_5, 2)
    ... mean, add eps, rsqrt, mul ...
    mul_18 = aten.mul.Tensor(post_attention_layernorm_weight, mul_17)
    _to_copy_6 = aten._to_copy(mul_18, dtype=torch.bfloat16)             # into gate/up
  ->
    add_rms_norm = orca_compile.kernels.norm_cpu.add_rms_norm(embedding, _linear_pointwise_3,
                       post_attention_layernorm_weight, 1e-06, True, torch.bfloat16)
    getitem = add_rms_norm[0]        # float32, add_5's readers
    getitem_1 = add_rms_norm[1]      # bfloat16, _to_copy_6's readers
"""
from __future__ import annotations

import operator

import torch
import torch.fx

from orca_compile.kernels import gemm_cpu, norm_cpu
from orca_compile.passes.graph_utils import CASTS, dtype_cast, fetch_attr

aten = torch.ops.aten
KERNELS = (norm_cpu.add_layer_norm, norm_cpu.add_rms_norm)
_REUSE_ARG = {norm_cpu.add_layer_norm: 5, norm_cpu.add_rms_norm: 4}  # where the call's ``reuse`` flag sits


def fuse_norms(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Rewrite ``gm``'s graph in place and return it; the counts go to ``gm.meta["orca_lowering"]``:
    ``fused_norms`` (layer norms), ``fused_rms_norms`` and, of both, ``norms_in_place`` (those
    allowed to write over their operands: ``s`` over ``x``, and ``y`` over ``r`` where their dtypes
    and layouts allow). A graph without the kernel available is returned as it is."""
    counts = _fuse(gm) if norm_cpu.available() else {"layer_norms": 0, "rms_norms": 0, "in_place": 0}
    gm.meta.setdefault("orca_lowering", {}).update(fused_norms=counts["layer_norms"],
                                                   fused_rms_norms=counts["rms_norms"],
                                                   norms_in_place=counts["in_place"])
    check(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def _fuse(gm: torch.fx.GraphModule) -> dict[str, int]:
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    counts = {"layer_norms": 0, "rms_norms": 0, "in_place": 0}
    candidates = [(_layer_norm, n) for n in graph.find_nodes(op="call_function", target=aten.layer_norm.default)]
    info = gm.meta.get("orca")  # graphs of 16-bit weights only (either arithmetic): see above
    if getattr(info, "weight_storage", None) is not None or getattr(info, "matmul_dtype", None) is not None:
        candidates += [(_rms_norm, n) for n in graph.find_nodes(op="call_function", target=aten.pow.Tensor_Scalar)]
    for matcher, node in candidates:
        # matched when its turn comes: an earlier rewrite may have replaced its input (GPT-NeoX's
        # two norms read one residual sum; the first takes the add, the second reads its result)
        match = matcher(gm, node)
        if match is None:
            continue
        kernel, s_node, y_node, dead, w, b, eps = match
        val = s_node.meta["val"]
        add = s_node if _plain_add(s_node, val) else None
        anchor = add if add is not None else dead[0]
        if any(isinstance(p, torch.fx.Node) and order[p] > order[anchor] for p in (w, b)):
            continue
        operands = tuple(add.args) if add is not None else (s_node, None)
        reuse = add is not None and operands[0] is not operands[1] and all(dies_at(o, add) for o in operands)
        widened = []  # add operands that are 16-bit results widened for the add alone: read in 16 bits
        if kernel is norm_cpu.add_rms_norm and add is not None and operands[0] is not operands[1]:
            narrow = [_widened_from(o, add) for o in operands]
            if narrow[1] is None and narrow[0] is not None:  # the kernel reads r in 16 bits, never x
                operands, narrow = operands[::-1], narrow[::-1]
            if narrow[1] is not None:
                widened = [operands[1]]
                reuse = dies_at(operands[0], add) and dies_at(narrow[1], operands[1])
                operands = (operands[0], narrow[1])
        if kernel is norm_cpu.add_layer_norm:
            args = operands + (w, b, float(eps), reuse)
        else:
            out = _narrowed_to(y_node)
            if out is not None:
                y_node = out
                dead.append(out)
            args = operands + (w, float(eps), reuse) + ((dtype_cast(out),) if out is not None else ())
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
        for cast in widened:
            graph.erase_node(cast)
        counts["layer_norms" if kernel is norm_cpu.add_layer_norm else "rms_norms"] += 1
        counts["in_place"] += reuse
    return counts


def _widened_from(node, add):
    """The 16-bit tensor ``node`` widens to float32 for ``add`` alone (``_to_copy(x16,
    dtype=float32)``), or None."""
    if dtype_cast(node) != torch.float32 or list(node.users) != [add]:
        return None
    src = node.args[0]
    val = src.meta.get("val") if isinstance(src, torch.fx.Node) else None
    # float16 only where the kernel was built with _Float16
    return src if isinstance(val, torch.Tensor) and norm_cpu.takes(val.dtype) else None


def _narrowed_to(y_node):
    """The cast to 16 bits that alone reads float32 ``y_node`` (``_to_copy(y, dtype=bfloat16 or
    float16)``), or None."""
    cast = _only_user(y_node)
    val = y_node.meta.get("val")
    narrow = dtype_cast(cast)
    if narrow is None or not norm_cpu.takes(narrow) or not isinstance(val, torch.Tensor) or val.dtype != torch.float32:
        return None
    return cast


def check(gm: torch.fx.GraphModule) -> None:
    """A norm written in place must be the last reader of both operands: anything else reading
    one would see the norm's results instead. And a oneDNN linear fed by a fused norm still reads
    its packed weight's dtype (the norm stores the 16-bit input its cast made)."""
    shared = [n.name for n in gm.graph.nodes if n.op == "call_function" and n.target in _REUSE_ARG
              and len(n.args) > _REUSE_ARG[n.target] and n.args[_REUSE_ARG[n.target]]
              and any(not dies_at(o, n) for o in n.args[:2])]
    if shared:
        raise AssertionError(f"fuse_norms: norms written over operands that are read elsewhere: {shared}")
    mixed = []
    for node in gm.graph.find_nodes(op="call_function", target=torch.ops.mkldnn._linear_pointwise.default):
        x, w = node.args[0], node.args[1]
        if not (_is(x, operator.getitem) and _is(x.args[0], *KERNELS) and x.args[1] == 1):
            continue
        weight = fetch_attr(gm, w.target) if isinstance(w, torch.fx.Node) and w.op == "get_attr" else None
        given = _y_dtype(x.args[0])
        if not isinstance(weight, torch.Tensor) or given != weight.dtype:
            mixed.append(f"{node.name} ({given} from {x.args[0].name}, "
                         f"{weight.dtype if isinstance(weight, torch.Tensor) else 'no'} weight)")
    if mixed:
        raise AssertionError(f"fuse_norms: oneDNN linears fed another dtype than their weight's: {mixed}")


def _y_dtype(call):
    """The dtype of a fused norm's ``y``: its ``out_dtype`` (RMS), else its ``x``'s (None if unknown)."""
    if call.target is norm_cpu.add_rms_norm and len(call.args) > 5 and call.args[5] is not None:
        return call.args[5]
    val = call.args[0].meta.get("val") if isinstance(call.args[0], torch.fx.Node) else None
    return val.dtype if isinstance(val, torch.Tensor) else None


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


def _rms_norm(gm, pow_node):
    s, exponent = pow_node.args[:2] if len(pow_node.args) >= 2 else (None, None)
    val = _rows_val(s)
    if val is None or pow_node.kwargs or exponent != 2 or (_is(s, *CASTS) and not _widens_sixteen_bit(s)):
        # a cast in front: HF computes this norm in float32 for a model of another dtype, and its
        # result must round as ATen's ops do there (the float64 tests compare with HF to 1e-6)
        return None
    mean = _only_user(pow_node)
    if not (_is(mean, aten.mean.dim) and len(mean.args) == 3 and not mean.kwargs and mean.args[2] is True
            and [d % val.dim() for d in mean.args[1]] == [val.dim() - 1]):
        return None
    add_eps = _only_user(mean)
    if not (_is(add_eps, aten.add.Tensor, aten.add.Scalar) and len(add_eps.args) == 2 and not add_eps.kwargs
            and add_eps.args[0] is mean and isinstance(add_eps.args[1], float)):
        return None
    rsqrt = _only_user(add_eps)
    if not (_is(rsqrt, aten.rsqrt.default) and len(rsqrt.args) == 1):
        return None
    normed = _only_user(rsqrt)
    if not (_is(normed, aten.mul.Tensor) and not normed.kwargs and len(normed.args) == 2
            and set(normed.args) == {s, rsqrt}):
        return None
    dead, w = [pow_node, mean, add_eps, rsqrt, normed], None
    scaled = _only_user(normed)
    if _is(scaled, aten.mul.Tensor) and len(scaled.args) == 2 and not scaled.kwargs:
        other = scaled.args[1] if scaled.args[0] is normed else scaled.args[0]
        if _param(gm, other, val.shape[-1], val.dtype):
            dead.append(scaled)
            w = other
    return norm_cpu.add_rms_norm, s, dead[-1], dead, w, None, add_eps.args[1]


def _widens_sixteen_bit(node) -> bool:
    src = node.args[0] if node.args else None
    val = src.meta.get("val") if isinstance(src, torch.fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dtype in norm_cpu.SIXTEEN_BIT and node.meta["val"].dtype == torch.float32


def _only_user(node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


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
