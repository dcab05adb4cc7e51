"""Human-readable dumps of the graphs: text, table, Graphviz dot, SVG, and a per-stage summary.

Shapes print with the symbols' meanings: ``T`` tokens of the iteration, ``B`` the batch (only
before ``flatten_tokens``), ``R`` requests, ``N`` rows of logits, ``NB`` cache blocks, ``BS`` block
size, ``MB`` blocks per request.
"""
from __future__ import annotations

import html
import re
import shutil
import subprocess

import sympy
import torch
import torch.fx

from orca_compile.passes.graph_utils import clean_module_path
from orca_compile.passes.manager import op_counts

FORMATS = ("text", "table", "dot", "svg")
_SHORT_SYMBOLS = {"num_seqs": "R", "num_blocks": "NB", "max_blocks_per_seq": "MB", "block_size": "BS",
                  "num_logits": "N"}
_DTYPE = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16",
          torch.int64: "i64", torch.int32: "i32", torch.bool: "b8"}


class Namer:
    """Prints symbolic sizes with readable names."""

    def __init__(self, gm: torch.fx.GraphModule):
        info = gm.meta.get("orca")
        self.subs = {}
        if info is not None:
            self.subs[info.token_symbol] = sympy.Symbol("T")
            self.subs[info.batch_symbol] = sympy.Symbol("B")
            for name, sym in getattr(info, "symbols", {}).items():
                self.subs[sym] = sympy.Symbol(_SHORT_SYMBOLS.get(name, name))

    def size(self, s) -> str:
        if isinstance(s, torch.SymInt):
            return str(s.node.expr.xreplace(self.subs))
        return str(s)

    def value(self, val) -> str:
        if isinstance(val, torch.Tensor):
            return f"{_DTYPE.get(val.dtype, str(val.dtype))}[{', '.join(self.size(s) for s in val.shape)}]"
        if isinstance(val, (tuple, list)):
            return "(" + ", ".join(self.value(v) for v in val) + ")"
        if isinstance(val, torch.SymInt):
            return f"Sym({self.size(val)})"
        return "" if val is None else type(val).__name__


def target_name(node: torch.fx.Node) -> str:
    if node.op != "call_function":
        return node.op
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        ns, name = t._schema.name.split("::")
        overload = t._overloadname
        return f"{ns}.{name}" + ("" if overload == "default" else f".{overload}")
    module = getattr(t, "__module__", "") or ""
    if module.startswith("orca_compile."):  # a kernel the lowering calls: gemm_cpu.linear, norm_cpu.add_layer_norm
        return f"{module.rpartition('.')[2]}.{t.__name__}"
    return getattr(t, "__name__", str(t))


def _arg_str(arg) -> str:
    if isinstance(arg, torch.fx.Node):
        return arg.name
    if isinstance(arg, (list, tuple)):
        return "[" + ", ".join(_arg_str(a) for a in arg) + "]"
    if isinstance(arg, float):
        return repr(arg) if len(repr(arg)) <= 10 else f"{arg:.6g}"
    return repr(arg) if not isinstance(arg, torch.dtype) else str(arg).replace("torch.", "")


def layer_of(node: torch.fx.Node) -> str:
    """The decoder layer a node belongs to ('' for embedding/head/glue)."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _cls in reversed(list(stack.values())):
        m = re.search(r"(?:layers|h|blocks|layer)\.(\d+)\b", clean_module_path(path))
        if m:
            return f"layer {m.group(1)}"
    if node.meta.get("orca_layer") is not None:
        return f"layer {node.meta['orca_layer']}"
    return ""


def format_text(gm: torch.fx.GraphModule) -> str:
    namer = Namer(gm)
    lines = []
    for node in gm.graph.nodes:
        val = namer.value(node.meta.get("val"))
        if node.op == "placeholder":
            lines.append(f"input  {node.name}: {val}")
        elif node.op == "get_attr":
            lines.append(f"weight {node.name}: {val}  <- {node.target}")
        elif node.op == "output":
            lines.append(f"return {_arg_str(node.args[0])}")
        else:
            args = [_arg_str(a) for a in node.args] + [f"{k}={_arg_str(v)}" for k, v in node.kwargs.items()]
            lines.append(f"{node.name}: {val} = {target_name(node)}({', '.join(args)})")
    return "\n".join(lines) + "\n"


def format_table(gm: torch.fx.GraphModule) -> str:
    namer = Namer(gm)
    rows = [("#", "node", "op", "shape", "layer", "users")]
    for i, node in enumerate(gm.graph.nodes):
        if node.op == "output":
            continue
        rows.append((str(i), node.name, target_name(node), namer.value(node.meta.get("val")),
                     layer_of(node), str(len(node.users))))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    out = []
    for j, row in enumerate(rows):
        out.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out) + "\n"


_COLORS = {"orca.attention": "#f4a261", "aten.scaled_dot_product_attention": "#e76f51",
           "aten.linear": "#8ecae6", "aten.addmm": "#8ecae6", "aten.embedding": "#90be6d",
           "aten.softmax": "#e76f51", "aten.index_select": "#f9c74f", "orca.expert_linear": "#b5838d"}


def format_dot(gm: torch.fx.GraphModule, title: str = "graph") -> str:
    """Graphviz dot: one box per node (name, op, shape), one cluster per decoder layer."""
    namer = Namer(gm)
    clusters: dict[str, list[str]] = {}
    lines = [f'digraph "{title}" {{', '  rankdir=TB; node [shape=box, style="rounded,filled", fillcolor=white, fontname="Helvetica", fontsize=10];',
             f'  label="{title}"; labelloc=t;']
    for node in gm.graph.nodes:
        op = target_name(node)
        label = f"{node.name}\\n{op}\\n{namer.value(node.meta.get('val'))}"
        color = _COLORS.get(op, "#dddddd" if node.op in ("placeholder", "get_attr", "output") else "white")
        decl = f'"{node.name}" [label="{html.escape(label, quote=True)}", fillcolor="{color}"];'
        clusters.setdefault(layer_of(node), []).append(decl)
    for layer, decls in clusters.items():
        if layer:
            lines.append(f'  subgraph "cluster_{layer}" {{ label="{layer}"; style=dashed;')
            lines += [f"    {d}" for d in decls]
            lines.append("  }")
        else:
            lines += [f"  {d}" for d in decls]
    for node in gm.graph.nodes:
        for inp in node.all_input_nodes:
            lines.append(f'  "{inp.name}" -> "{node.name}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def dot_to_svg(dot_source: str) -> str:
    exe = shutil.which("dot")
    if exe is None:
        raise RuntimeError("SVG output needs Graphviz's `dot`, which is not installed: "
                           "apt-get install graphviz (Debian/Ubuntu), brew install graphviz (macOS), "
                           "or use --format dot")
    done = subprocess.run([exe, "-Tsvg"], input=dot_source, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"dot failed: {done.stderr.strip()}")
    return done.stdout


def render(gm: torch.fx.GraphModule, fmt: str, title: str = "graph") -> str:
    if fmt == "text":
        return format_text(gm)
    if fmt == "table":
        return format_table(gm)
    if fmt == "dot":
        return format_dot(gm, title)
    if fmt == "svg":
        return dot_to_svg(format_dot(gm, title))
    raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")


_SUMMARY_KEYS = ("ops", "inputs", "embedding", "linear", "sdpa", "softmax", "matmul", "orca.attention", "index_select",
                 "expert_linear", "all_reduce", "all_gather")


def expert_layers(gm: torch.fx.GraphModule) -> list[tuple[str, int, int]]:
    """``(layer, experts, top_k)`` of each layer holding ``orca.expert_linear`` ops, in graph order."""
    from orca_compile.ops import EXPERT_LINEAR

    found = {}
    for node in gm.graph.find_nodes(op="call_function", target=EXPERT_LINEAR):
        weight, ids = node.args[2].meta.get("val"), node.args[1].meta.get("val")
        if weight is not None and ids is not None:
            found.setdefault(layer_of(node), (int(weight.shape[0]), int(ids.shape[-1])))
    return [(layer, e, k) for layer, (e, k) in found.items()]


def summary(compiled) -> str:
    """One row per stage with the op counts people ask about, then what each pass changed."""
    stages = list(compiled.stages.items())
    rows = [("stage", *_SUMMARY_KEYS)]
    for stage, gm in stages:
        counts = op_counts(gm)
        rows.append((stage, *(str(counts[k]) for k in _SUMMARY_KEYS)))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    moe = expert_layers(compiled.graph_module)
    experts = ""
    if moe:
        shapes = sorted({f"{e} experts, top {k}" for _, e, k in moe})
        experts = f" ({len(moe)} mixture-of-experts: {'; '.join(shapes)})"
    out = [f"{compiled.model_class}: {compiled.num_layers} layers{experts}, vocab {compiled.vocab_size}, backend "
           f"{compiled.backend}; capture {compiled.capture_seconds:.2f}s, passes {compiled.pass_seconds:.2f}s", ""]
    for j, row in enumerate(rows):
        out.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    out.append("")
    for rec in compiled.records:
        changes = ", ".join(f"{k} {v:+d}" for k, v in rec.changes().items()) or "no count changed"
        out.append(f"{rec.name:>23} -> {rec.stage:<9} {rec.seconds * 1000:7.1f} ms  {changes}")
    return "\n".join(out) + "\n"
