"""flatten_tokens: remove the batch dimension; every op works on ``[T, ...]``.

Requires: a captured graph whose inputs are ``input_ids``/``position_ids`` of shape ``[B, T]`` with
``B`` and ``T`` distinct symbols (``capture``).
Ensures: no tensor in the graph has a dimension of size ``B``; ``B`` appears in no shape; each
node's new shape is its old shape with the ``B`` dimension removed and ``B := 1`` (checked node by
node, with sympy); dense and position-wise ops (embedding, linear, norms, activations, residual
adds, rotary, attention inputs, LM head) are rewritten, not wrapped.

Before / after (Llama, one layer's q projection)::

    linear: f32[B, T, 64] = aten.linear(mul_4, q_proj_weight)
    view: f32[B, T, 4, 16] = aten.view(linear, [sym_size_B, sym_size_T, -1, 16])
    transpose: f32[B, 4, T, 16] = aten.transpose.int(view, 1, 2)
  ->
    linear: f32[T, 64] = aten.linear(mul_4, q_proj_weight)
    view: f32[T, 4, 16] = aten.view(linear, [sym_size_T, -1, 16])
    transpose: f32[4, T, 16] = aten.transpose.int(view, 0, 1)

How: a dimension is the batch dimension iff its size is the symbol ``B``, so every node knows where
its batch dimension is (``bdim``). Ops with a rule below get their dim arguments, size lists and
broadcasting operands remapped. Any other op (HF's mask-building code: ``index``, ``cumsum``,
``diff``…, dead once attention is split) is *wrapped*: its inputs get the size-1 batch dim back
(``unsqueeze``), it runs as before, and its output loses it (``squeeze``). Wrapping is exact, so
the pass never guesses; the structural tests check that no dense op was wrapped.
"""
from __future__ import annotations

import operator

import sympy
import torch
import torch.fx

from orca_compile import env
from orca_compile.passes.graph_utils import val as _val

aten = torch.ops.aten

# ops that are elementwise with numpy broadcasting; beyond those tagged ``pointwise``
_POINTWISE_EXTRA = {
    aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default, aten.clone.default,
    aten.contiguous.default, aten.alias.default, aten.dropout.default, aten.detach.default,
    aten.type_as.default, aten.gelu.default, aten.silu.default, aten.relu.default,
    aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self, aten.where.ScalarOther,
    aten.where.ScalarSelf, aten.lift_fresh_copy.default,
}
# op -> names of the arguments that are dims of the (first) input
_DIM_ARGS = {
    aten.transpose.int: ("dim0", "dim1"),
    aten.slice.Tensor: ("dim",),
    aten.select.int: ("dim",),
    aten.narrow.default: ("dim",),
    aten.squeeze.dim: ("dim",),
    aten.squeeze.dims: ("dim",),
    aten.mean.dim: ("dim",),
    aten.sum.dim_IntList: ("dim",),
    aten.amax.default: ("dim",),
    aten.amin.default: ("dim",),
    aten.max.dim: ("dim",),
    aten.min.dim: ("dim",),
    aten.argmax.default: ("dim",),
    aten.topk.default: ("dim",),
    aten.sort.default: ("dim",),
    aten.softmax.int: ("dim",),
    aten._softmax.default: ("dim",),
    aten.log_softmax.int: ("dim",),
    aten._log_softmax.default: ("dim",),
    aten.split.Tensor: ("dim",),
    aten.split_with_sizes.default: ("dim",),
    aten.chunk.default: ("dim",),
    aten.unbind.int: ("dim",),
    aten.cumsum.default: ("dim",),
    aten.index_select.default: ("dim",),
    aten.var_mean.correction: ("dim",),
    aten.var.correction: ("dim",),
}
_VIEW_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
# ops batched over all dims but the last two of each operand
_BATCHED_MATRIX_OPS = {aten.matmul.default, aten.scaled_dot_product_attention.default, aten.bmm.default}


# ops whose meta function fails on symbolic sizes, and an op of the same output to stand in for
# them when only the value's metadata is computed: torch's ``meta_baddbmm`` expands a broadcast
# bias (Bloom's ALiBi, ``[heads, 1, T]``) through the concrete-size ``expand`` and raises.
_FAKE_AS = {
    aten.baddbmm.default: lambda bias, a, b, **_: torch.bmm(a, b).to(torch.promote_types(bias.dtype, a.dtype)),
}


class _Unsupported(Exception):
    """This node cannot be rewritten dimension-wise; it gets wrapped instead."""


def flatten_tokens(gm: torch.fx.GraphModule, verify: bool | None = None) -> torch.fx.GraphModule:
    """``verify`` (default: env ``ORCA_VERIFY_PASSES=1``) re-runs every rewritten op on fake
    tensors and checks its shape against the expected one; otherwise a rewritten node's metadata
    is derived from the old node's (its shape and strides without the batch dim), which is what
    keeps the pass well under export's own time."""
    if verify is None:
        verify = env.get().verify_passes
    info = gm.meta["orca"]
    return _Flattener(gm, info.batch_symbol, verify).run()


def _expr(size):
    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(size)


class _Flattener:
    def __init__(self, gm: torch.fx.GraphModule, batch: sympy.Symbol, verify: bool):
        self.gm, self.batch, self.verify = gm, batch, verify
        self.graph = torch.fx.Graph()
        self.env: dict[torch.fx.Node, object] = {}  # old node -> new Node or Python constant
        self.wrapped_tuples: set[torch.fx.Node] = set()  # new nodes whose tuple elements keep B
        self.fake_mode = torch._guards.detect_fake_mode(
            [n.meta["val"] for n in gm.graph.nodes if isinstance(_val(n), torch.Tensor)])
        self.num_wrapped = 0

    # -- batch dimension bookkeeping -------------------------------------------------------
    def bdim(self, value) -> int | None:
        if isinstance(value, torch.fx.Node):
            value = _val(value)
        if not isinstance(value, torch.Tensor):
            return None
        dims = [i for i, s in enumerate(value.shape) if isinstance(s, torch.SymInt) and s.node.expr == self.batch]
        if len(dims) > 1:
            raise ValueError(f"a tensor has the batch size in two dims {dims}: {tuple(value.shape)}")
        return dims[0] if dims else None

    def expected_shape(self, old_val):
        b = self.bdim(old_val)
        return [sympy.expand(_expr(s).subs(self.batch, 1)) for i, s in enumerate(old_val.shape) if i != b]

    # -- emitting ---------------------------------------------------------------------------
    def emit(self, target, args, kwargs=None, meta=None, like=None):
        """Add a node; its ``val`` comes from running the op on fake tensors, or (``like``, the old
        node, when not verifying) from the old value without its batch dim."""
        kwargs = kwargs or {}
        name = meta.get("orca_name") if meta else None
        node = self.graph.call_function(target, tuple(args), kwargs, name=name)
        if meta:
            node.meta.update({k: v for k, v in meta.items() if k not in ("val", "orca_name")})
        fast = None if self.verify or like is None else self.derived_val(like)
        if fast is not None:
            node.meta["val"] = fast
            return node
        vals = torch.fx.node.map_arg((args, kwargs), lambda n: n.meta["val"])
        with self.fake_mode:
            node.meta["val"] = _FAKE_AS.get(target, target)(*vals[0], **vals[1])
        return node

    def derived_val(self, old_node):
        old = _val(old_node)
        if not isinstance(old, torch.Tensor):
            return None
        b = self.bdim(old)
        keep = [i for i in range(old.dim()) if i != b]
        sizes = [old.shape[i] for i in keep]
        strides = [old.stride(i) for i in keep]
        if any(self.batch in _expr(s).free_symbols for s in (*sizes, *strides)):
            return None  # e.g. [B*T, H]: let the op compute it
        with self.fake_mode:
            return torch.empty_strided(sizes, strides, dtype=old.dtype, device=old.device)

    def mapped(self, arg):
        return torch.fx.node.map_arg(arg, lambda n: self.env[n])

    def squeeze(self, new, dim, meta=None):
        return self.emit(aten.squeeze.dim, [new, dim], meta=meta)

    # -- driver -----------------------------------------------------------------------------
    def run(self) -> torch.fx.GraphModule:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                new = self.graph.placeholder(node.name)
                new.meta.update(node.meta)
                b = self.bdim(node)
                if b is not None:
                    with self.fake_mode:
                        new.meta["val"] = node.meta["val"].select(b, 0)
                self.env[node] = new
            elif node.op == "get_attr":
                new = self.graph.get_attr(node.target)
                new.meta.update(node.meta)
                self.env[node] = new
            elif node.op == "output":
                self.graph.output(self.mapped(node.args[0]))
            elif node.op == "call_function":
                self.env[node] = self.rewrite(node)
                self.check(node)
            else:
                raise ValueError(f"flatten_tokens: unexpected {node.op} node {node.name}")
        out = torch.fx.GraphModule(self.gm, self.graph)
        out.meta.update(self.gm.meta)
        out.meta["flatten_tokens.num_wrapped"] = self.num_wrapped
        _postcondition(out, self.batch)
        return out

    def check(self, node):
        old, new = _val(node), _val(self.env[node]) if isinstance(self.env[node], torch.fx.Node) else None
        if not isinstance(old, torch.Tensor):
            return
        got = [_expr(s) for s in new.shape]
        want = self.expected_shape(old)
        if len(got) != len(want) or any(sympy.expand(g - w) != 0 for g, w in zip(got, want)) or new.dtype != old.dtype:
            raise AssertionError(
                f"flatten_tokens: {node.name} ({node.target}) became {new.dtype}{got}, expected {old.dtype}{want}")

    def rewrite(self, node):
        target = node.target
        if target is aten.sym_size.int:
            return self.rule_sym_size(node)
        if target is operator.getitem:
            return self.rule_getitem(node)
        if not isinstance(target, torch._ops.OpOverload):
            # Python arithmetic on SymInts: sizes of B are already mapped to 1
            return self.emit(target, self.mapped(node.args), self.mapped(node.kwargs), {**node.meta, "orca_name": node.name})
        args = _full_args(node)
        inputs_b = [self.bdim(a) for a in _tensor_args(args)]
        out_val = _val(node)
        outs = out_val if isinstance(out_val, (tuple, list)) else [out_val]
        if all(b is None for b in inputs_b) and all(self.bdim(o) is None for o in outs):
            return self.emit_args(node, args)  # nothing batched here (weights, sizes, mm on [B*T, H])
        try:
            return self.rule(node, args)
        except _Unsupported:
            return self.wrap(node, args)

    def emit_args(self, node, args, overrides=None, derive=True):
        """Re-emit ``node`` (keeping its name) with mapped args, some of them replaced."""
        overrides = overrides or {}
        pos, kw = [], {}
        for (name, value, kwarg_only) in args:
            value = overrides[name] if name in overrides else self.mapped(value)
            if kwarg_only:
                kw[name] = value
            else:
                pos.append(value)
        return self.emit(node.target, pos, kw, {**node.meta, "orca_name": node.name}, like=node if derive else None)

    # -- rules ------------------------------------------------------------------------------
    def rule(self, node, args):
        target = node.target
        out_b = self.bdim(node)
        values = {name: value for name, value, _ in args}
        first = args[0][1]
        in_b = self.bdim(first)
        if target in _VIEW_OPS or target is aten.expand.default:
            size_name = args[1][0]  # "size" or "shape"
            size = list(values[size_name])
            overrides = {}
            if target is aten.expand.default:
                overrides["self"] = self.broadcast_operand(first, out_b, len(size))
            if out_b is not None:
                del size[out_b]
            overrides[size_name] = self.mapped(size)
            return self.emit_args(node, args, overrides)
        if target is aten.unsqueeze.default:
            if in_b is None:
                raise _Unsupported
            dim = values["dim"] % (_val(first).dim() + 1)
            return self.emit_args(node, args, {"dim": dim - (dim > out_b)})
        if target is aten.permute.default:
            dims = [d % _val(first).dim() for d in values["dims"]]
            return self.emit_args(node, args, {"dims": [d - (d > in_b) for d in dims if d != in_b]})
        if target is aten.cat.default:
            tensors = values["tensors"]
            if out_b is None or any(self.bdim(t) != out_b for t in tensors):
                raise _Unsupported
            return self.emit_args(node, args, {"dim": _remap(values["dim"], out_b, _val(node).dim())})
        if target in _DIM_ARGS:
            if in_b is None:
                raise _Unsupported
            rank = _val(first).dim()
            overrides = {name: _remap(values[name], in_b, rank) for name in _DIM_ARGS[target]
                         if values[name] is not None}
            return self.emit_args(node, args, overrides)
        if target is aten.embedding.default:
            return self.emit_args(node, args)
        if target in (aten.linear.default, aten.layer_norm.default, aten.rms_norm.default):
            normalized = 1 if target is aten.linear.default else len(values["normalized_shape"])
            if in_b is None or in_b >= _val(first).dim() - normalized:
                raise _Unsupported
            return self.emit_args(node, args)
        if target in _BATCHED_MATRIX_OPS:
            if out_b is None or out_b >= _val(node).dim() - 2:
                raise _Unsupported
            overrides = {name: self.broadcast_operand(value, out_b, _val(node).dim(), matrix=True)
                         for name, value, _ in args if isinstance(_val(value), torch.Tensor)}
            return self.emit_args(node, args, overrides)
        if torch.Tag.pointwise in target.tags or target in _POINTWISE_EXTRA:
            if out_b is None:
                raise _Unsupported
            overrides = {name: self.broadcast_operand(value, out_b, _val(node).dim())
                         for name, value, _ in args if isinstance(_val(value), torch.Tensor)}
            return self.emit_args(node, args, overrides)
        raise _Unsupported

    def broadcast_operand(self, value, out_b, out_rank, matrix=False):
        """An operand of a broadcasting op, with the dim aligned to the output's B dim removed."""
        new = self.mapped(value)
        if self.bdim(value) is not None:
            return new
        rank = _val(value).dim()
        if matrix and rank <= 2:
            return new  # a plain matrix has no batch dims to align
        aligned = out_b - (out_rank - rank)
        if aligned < 0:
            return new
        if _val(value).shape[aligned] != 1:
            raise _Unsupported
        return self.squeeze(new, aligned)

    def rule_sym_size(self, node):
        x, dim = node.args
        b = self.bdim(x)
        dim = dim % _val(x).dim()
        if dim == b:
            return 1
        return self.emit(aten.sym_size.int, [self.env[x], dim - (b is not None and dim > b)], meta=node.meta)

    def rule_getitem(self, node):
        tup, index = node.args
        new_tup = self.env[tup]
        item = self.emit(operator.getitem, [new_tup, index], meta=node.meta)
        b = self.bdim(node)
        if new_tup in self.wrapped_tuples and b is not None:
            return self.squeeze(item, b, node.meta)
        return item

    def wrap(self, node, args):
        """Run the op with the size-1 batch dim restored; exact for any op."""
        self.num_wrapped += 1
        overrides = {}
        for name, value, _ in args:
            overrides[name] = torch.fx.node.map_aggregate(value, self.unflatten)
        new = self.emit_args(node, args, overrides, derive=False)  # keeps its size-1 batch dim
        out_val = _val(node)
        if isinstance(out_val, (tuple, list)):
            self.wrapped_tuples.add(new)
            return new
        b = self.bdim(node)
        return new if b is None else self.squeeze(new, b, node.meta)

    def unflatten(self, value):
        if not isinstance(value, torch.fx.Node):
            return value
        new = self.env[value]
        b = self.bdim(value)
        if b is None:
            return new
        return self.emit(aten.unsqueeze.default, [new, b], meta=value.meta)


def _remap(dim, bdim, rank):
    """A dim index of a tensor with its batch dim at ``bdim`` -> the index once that dim is gone."""
    if isinstance(dim, (list, tuple)):
        return [_remap(d, bdim, rank) for d in dim]
    d = dim % rank
    if d == bdim:
        raise _Unsupported
    return d - (d > bdim)


def _full_args(node):
    """[(name, value, kwarg_only)] for every schema argument, defaults filled in."""
    schema = node.target._schema
    out = []
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args) and not arg.kwarg_only:
            value = node.args[i]
        elif arg.name in node.kwargs:
            value = node.kwargs[arg.name]
        elif arg.has_default_value():
            value = arg.default_value
            if arg.kwarg_only:
                continue  # leave defaults of keyword-only args to the op
        else:
            value = None
        out.append((arg.name, value, arg.kwarg_only))
    return out


def _tensor_args(args):
    found = []
    for _, value, _ in args:
        torch.fx.node.map_arg(value, lambda n: found.append(n) if isinstance(_val(n), torch.Tensor) else None)
    return found


def _postcondition(gm: torch.fx.GraphModule, batch) -> None:
    for node in gm.graph.nodes:
        val = _val(node)
        vals = val if isinstance(val, (tuple, list)) else [val]
        for v in vals:
            if isinstance(v, torch.Tensor) and any(batch in _expr(s).free_symbols for s in v.shape):
                raise AssertionError(f"flatten_tokens: {node.name} still has the batch symbol: {tuple(v.shape)}")
    gm.graph.lint()
