"""Small helpers the passes share: node values, module attributes, symbolic sizes, module paths."""
from __future__ import annotations

import re

import torch
import torch.fx

aten = torch.ops.aten
# dtype/device conversions; identities when input and output agree
CASTS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.to.device}


def val(node):
    """The node's ``meta["val"]`` (a FakeTensor, SymInt or tuple), or None for non-nodes."""
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def dtype_cast(node):
    """The dtype ``node`` casts to when it is ``_to_copy(x, dtype=...)`` with nothing else set (no
    device, layout or memory format), else None."""
    if (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is aten._to_copy.default
            and len(node.args) == 1 and set(node.kwargs) == {"dtype"}):
        return node.kwargs["dtype"]
    return None


def fetch_attr(gm: torch.nn.Module, target: str):
    """The attribute a ``get_attr`` target names (``a.b.c``), or None where a link is missing."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def new_symint(shape_env, name: str, hint: int) -> torch.SymInt:
    """A fresh backed size symbol (for a new graph input's shape); ``hint`` is only an example."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic

    source = ConstantSource(name)
    expr = shape_env.create_symbol(hint, source, dynamic_dim=DimDynamic.DYNAMIC)
    return shape_env.create_symintnode(expr, hint=hint, source=source)


def clean_module_path(path: str) -> str:
    """export's ``L['self'].model._modules['layers']...`` spelling -> ``model.layers...``."""
    return re.sub(r"^L\['self'\]\.?", "", path).replace("._modules['", ".").replace("']", "")
