"""lower_cpu: lower the final graph's linear layers to oneDNN with weights packed once, and fold the
activation that follows each one into the GEMM's epilogue.

Requires: the ``final`` graph, weights on the CPU in float32, oneDNN available (``applies(gm)``
says whether it does). Ensures (checked): no ``addmm`` / ``linear`` / ``mm`` on a weight of the
graph is left; each became ``mkldnn._linear_pointwise`` on a packed copy of its weight; a
pointwise chain that hangs off one linear alone and computes an activation oneDNN has (GELU,
tanh-GELU, SiLU, ReLU, sigmoid, tanh) is gone, done in the linear's epilogue. Everything else is
untouched; the input graph module is not modified (the result is a new module sharing its other
weights).

Why. Decode iterations multiply a few dozen rows by every weight matrix. ``torch.addmm`` hands
the weight to MKL, which re-packs it on every call; with weights streamed from DRAM that costs as
much as the product. A weight packed once into oneDNN's blocked layout (``_reorder_linear_weight``)
makes GPT-2 small's 48 layer GEMMs plus its LM head 1.75x faster at 32 rows, 2.34x at 8, 1.53x
at 1 and 1.20x at 512 (``benchmarks/cpu_linear.py``). It costs memory: one packed copy of each linear weight (the
original stays with the unlowered graph).

How the activation is found. Like ``split_attention`` with the mask, this pass does not
pattern-match HF's activation code: it collects the pointwise nodes whose only tensor input is
the linear's output (transitively), requires one exit, *evaluates* that subgraph in float64 on a
probe range and compares it with each activation oneDNN can fuse. GPT-2's ``gelu_new`` (eight
ATen ops: pow, mul, add, tanh, ...) matches ``gelu/tanh``; Llama's ``silu(gate_proj(x))`` matches
``swish``. A chain that matches nothing stays as it was.

Before / after (GPT-2 MLP)::

    addmm_2 = aten.addmm(mlp_c_fc_bias, layer_norm_1, mlp_c_fc_weight)
    mul_8 = aten.mul.Tensor(addmm_2, 0.5)
    pow_1 = aten.pow.Tensor_Scalar(addmm_2, 3.0)
    ...                                                  # mul, add, mul, tanh, add
    mul_11 = aten.mul.Tensor(mul_8, add_5)
  ->
    _packed_mlp_c_fc_weight = get_attr[_packed_mlp_c_fc_weight]   # [out, in], oneDNN layout
    linear_pointwise = mkldnn._linear_pointwise(layer_norm_1, _packed_mlp_c_fc_weight, mlp_c_fc_bias,
                                                "gelu", [], "tanh")
"""
from __future__ import annotations

import copy

import torch
import torch.fx

aten = torch.ops.aten
PACKED_LINEAR = torch.ops.mkldnn._linear_pointwise.default
PACK_ROWS_HINT = 32  # the row count oneDNN tunes the packed layout for; any count runs (measured: 1-512 within 10%)

# pointwise ops an activation chain may consist of (one tensor input each, scalars otherwise)
_POINTWISE = {
    aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor, aten.rsub.Scalar,
    aten.mul.Scalar, aten.add.Scalar, aten.sub.Scalar, aten.div.Scalar, aten.pow.Tensor_Scalar,
    aten.tanh.default, aten.sigmoid.default, aten.silu.default, aten.relu.default, aten.gelu.default,
    aten.erf.default, aten.exp.default, aten.neg.default, aten.reciprocal.default, aten.sqrt.default,
}
# (oneDNN post-op, algorithm, float64 reference)
_ACTIVATIONS = (
    ("gelu", "tanh", lambda x: torch.nn.functional.gelu(x, approximate="tanh")),
    ("gelu", "none", torch.nn.functional.gelu),
    ("swish", "", torch.nn.functional.silu),
    ("relu", "", torch.relu),
    ("sigmoid", "", torch.sigmoid),
    ("tanh", "", torch.tanh),
)
_PROBE = torch.cat([torch.linspace(-12.0, 12.0, 4801, dtype=torch.float64),
                    torch.tensor([-1e-3, -1e-6, 0.0, 1e-6, 1e-3, 30.0, -30.0], dtype=torch.float64)])


def available() -> bool:
    """oneDNN is built in and has the packed-linear ops this pass emits."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def unmet(gm: torch.fx.GraphModule) -> str | None:
    """Why the lowering cannot apply to ``gm`` (None: it can): oneDNN missing, no linear layers,
    or linear weights that are not float32 on the CPU."""
    if not available():
        return "this torch is built without oneDNN"
    weights = [w for _, w, _ in _linears(gm)]
    if not weights:
        return "the graph has no linear layers on its weights"
    kinds = sorted({f"{w.dtype} on {w.device}" for w in weights})
    if kinds != ["torch.float32 on cpu"]:
        return f"it needs float32 weights on the CPU; this model has {', '.join(kinds)}"
    return None


def applies(gm: torch.fx.GraphModule) -> bool:
    return unmet(gm) is None


def lower_cpu(gm: torch.fx.GraphModule, *, fuse_activations: bool = True) -> torch.fx.GraphModule:
    why = unmet(gm)
    if why:
        raise ValueError(f"lower_cpu cannot apply: {why}")
    out = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    out.meta.update(gm.meta)
    graph = out.graph
    packed: dict[int, str] = {}  # id(weight tensor) -> attribute holding its packed copy
    fused = {}
    for node, weight, weight_is_in_out in _linears(out):
        key = id(weight)
        if key not in packed:
            w = weight.detach().t() if weight_is_in_out else weight.detach()
            name = "_packed_" + _attr_name(node, weight_is_in_out)
            while hasattr(out, name):
                name += "_"
            out.register_buffer(name, torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), PACK_ROWS_HINT),
                                persistent=False)
            packed[key] = name
        x, bias = _operands(node)
        chain, exit_node, act = (_activation(node) if fuse_activations else (None, None, None))
        with graph.inserting_before(node):
            w_node = graph.get_attr(packed[key])
            attr, alg = act if act else ("none", "")
            new = graph.call_function(PACKED_LINEAR, (x, w_node, bias, attr, [], alg))
        replaced = exit_node if act else node
        new.meta = dict(node.meta)
        new.meta["val"] = replaced.meta.get("val")
        replaced.replace_all_uses_with(new)
        for dead in reversed(chain if act else [node]):
            graph.erase_node(dead)
        if act:
            key = f"{attr}/{alg}" if alg else attr
            fused[key] = fused.get(key, 0) + 1
    graph.eliminate_dead_code()
    out.meta["orca_lowering"] = {"packed_weights": len(packed), "fused_activations": fused}
    _postcondition(out)
    out.recompile()
    return out


def _linears(gm):
    """(node, weight tensor, weight stored [in, out]) for every matmul against a graph weight."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        t, a = node.target, node.args
        if t is aten.addmm.default and not node.kwargs and len(a) == 3:
            w = _weight(gm, a[2])
            if w is not None:
                found.append((node, w, True))
        elif t is aten.linear.default and len(a) >= 2:
            w = _weight(gm, a[1])
            if w is not None:
                found.append((node, w, False))
        elif t is aten.mm.default:
            w = _weight(gm, a[1])
            if w is not None:
                found.append((node, w, True))
    return found


def _weight(gm, node):
    if isinstance(node, torch.fx.Node) and node.op == "get_attr":
        w = _fetch(gm, node.target)
        if isinstance(w, torch.Tensor) and w.dim() == 2 and w.layout == torch.strided:
            return w
    return None


def _fetch(gm, target):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _operands(node):
    t, a = node.target, node.args
    if t is aten.addmm.default:
        return a[1], a[0]
    if t is aten.linear.default:
        return a[0], (a[2] if len(a) > 2 else node.kwargs.get("bias"))
    return a[0], None  # mm


def _attr_name(node, weight_is_in_out):
    arg = node.args[2] if node.target is aten.addmm.default else node.args[1]
    return str(arg.target).replace(".", "_")


def _activation(linear):
    """(chain nodes in graph order, exit node, (post-op, algorithm)) or (None, None, None)."""
    chain, members = [linear], {linear}
    ref = linear.meta.get("val")
    for node in _after(linear):
        if node.op != "call_function" or node.target not in _POINTWISE:
            continue
        tensors = [a for a in node.all_input_nodes]
        if tensors and all(a in members for a in tensors):
            v = node.meta.get("val")
            if v is None or ref is None or v.shape != ref.shape or v.dtype != ref.dtype:
                continue
            chain.append(node)
            members.add(node)
    exits = [n for n in chain if any(u not in members for u in n.users) or not n.users]
    if len(chain) == 1 or exits != [chain[-1]] or linear in exits:
        return None, None, None
    got = _evaluate(chain, _PROBE)
    if got is None:
        return None, None, None
    for attr, alg, fn in _ACTIVATIONS:
        want = fn(_PROBE)
        if torch.allclose(got, want, rtol=1e-9, atol=1e-9):
            return chain, chain[-1], (attr, alg)
    return None, None, None


def _after(node):
    n = node.next
    while n.op != "root":
        yield n
        n = n.next


def _evaluate(chain, probe):
    env = {chain[0]: probe}
    try:
        for node in chain[1:]:
            args = torch.fx.node.map_arg(node.args, lambda n: env[n])
            kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: env[n])
            env[node] = node.target(*args, **kwargs)
    except Exception:  # an op that does not take float64 probes: leave the chain alone
        return None
    out = env[chain[-1]]
    return out if isinstance(out, torch.Tensor) and out.shape == probe.shape else None


def _postcondition(gm):
    left = [n.name for n, _, _ in _linears(gm)]
    if left:
        raise AssertionError(f"lower_cpu: matmuls on weights left unlowered: {left}")
    gm.graph.lint()
