"""pipeline_stage: the graph of one pipeline stage, cut out of a ``final`` graph at layer boundaries.

Each node belongs to the decoder layer its module path names (``model.layers.3...``,
``transformer.h.3...``); ``orca::attention`` to the layer ``split_attention`` numbered. Stage ``s``
of ``n`` holds the layers ``[cuts[s], cuts[s + 1])`` (``cuts`` default: as even as the layer count
allows); the prelude (embeddings) goes with the first stage, the epilogue (final norm, the rows
whose logits are kept, the LM head) with the last. What the positions alone determine (the rotary
tables, ``T``'s size) is recomputed by every stage that reads it rather than sent.

Between two stages exactly one tensor may cross: the residual stream ``[T, hidden]``. A stage
after the first takes it as its first input, ``hidden``; a stage before the last returns it. The
stage keeps only its layers' weights and its layers' KV cache inputs (``k_cache_i``, ``v_cache_i``
renumbered from 0), so a rank of the pipeline allocates its own layers' cache and nothing else.

Requires: a ``final`` graph whose layers its module paths name. Ensures (checked): the stage's
attention layers are its layers in order; one crossing tensor; lints. A graph where anything but
the residual stream crosses a cut, or a stage count outside ``[1, layers]``, is a ``ValueError``.
"""
from __future__ import annotations

import re

import torch
import torch.fx

from orca_compile.ops import ATTENTION
from orca_compile.passes.graph_utils import clean_module_path

_LAYER = re.compile(r"(?:layers|h|blocks|layer)\.(\d+)\b")
_KV = re.compile(r"^(k|v)_cache_(\d+)$")


def layer_of(node: torch.fx.Node) -> int | None:
    if node.meta.get("orca_layer") is not None:
        return int(node.meta["orca_layer"])
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        m = _LAYER.search(clean_module_path(path))
        if m:
            return int(m.group(1))
    return None


def even_cuts(num_layers: int, num_stages: int) -> list[int]:
    """``num_stages + 1`` layer indices, the first stages one layer longer where it does not divide."""
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or not 1 <= num_stages <= num_layers:
        raise ValueError(f"pipeline_parallel_size must be an integer in [1, {num_layers}] (the layers), "
                         f"got {num_stages!r}")
    base, extra = divmod(num_layers, num_stages)
    cuts = [0]
    for s in range(num_stages):
        cuts.append(cuts[-1] + base + (s < extra))
    return cuts


def pipeline_stage(gm: torch.fx.GraphModule, stage: int, num_stages: int,
                   cuts: list[int] | None = None) -> torch.fx.GraphModule:
    """Stage ``stage`` of ``num_stages`` as a module of its own (``gm`` is untouched)."""
    graph = gm.graph
    num_layers = len(list(graph.find_nodes(op="call_function", target=ATTENTION)))
    cuts = cuts or even_cuts(num_layers, num_stages)
    if len(cuts) != num_stages + 1 or cuts[0] != 0 or cuts[-1] != num_layers or sorted(cuts) != cuts:
        raise ValueError(f"cuts {cuts} do not split {num_layers} layers into {num_stages} stages")
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} is outside [0, {num_stages})")
    placement = _place(graph, cuts)
    lo, hi = cuts[stage], cuts[stage + 1]
    position_only = _position_only(graph)
    # the nodes this stage runs: its own, plus the position-only values they read
    mine = [n for n in graph.nodes if n.op == "call_function" and placement.get(n) == stage]
    needed = set(mine)
    stack = list(mine)
    while stack:
        for arg in stack.pop().all_input_nodes:
            if arg not in needed and (arg.op in ("get_attr", "placeholder") or arg in position_only):
                needed.add(arg)
                stack.append(arg)
    crossing_in = [a for n in mine for a in n.all_input_nodes
                   if a.op == "call_function" and a not in needed and placement.get(a, -1) < stage]
    crossing_in = list(dict.fromkeys(crossing_in))
    crossing_out = [n for n in mine if n not in position_only  # those, a later stage recomputes
                    and any(placement.get(u, stage) > stage and u.op != "output" for u in n.users)]
    last = stage == num_stages - 1
    for what, nodes in (("into", crossing_in), ("out of", crossing_out)):
        if len(nodes) > 1:
            raise ValueError(f"pipeline: {len(nodes)} values cross {what} stage {stage} "
                             f"({', '.join(n.name for n in nodes)}); only the residual stream may")
    if stage > 0 and not crossing_in or not last and not crossing_out:
        raise ValueError(f"pipeline: no residual stream crosses the cut at stage {stage}")

    new = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    if stage > 0:
        hidden = new.placeholder("hidden")
        hidden.meta = dict(crossing_in[0].meta)
        env[crossing_in[0]] = hidden
    for n in graph.nodes:
        if n.op == "placeholder" and n in needed:
            m = _KV.match(n.target)
            name = f"{m.group(1)}_cache_{int(m.group(2)) - lo}" if m else n.target
            p = new.placeholder(name)
            p.meta = dict(n.meta)
            env[n] = p
    for n in graph.nodes:
        if n.op in ("get_attr", "call_function") and n in needed and n not in env:
            env[n] = new.node_copy(n, lambda a: env[a])
    if last:
        new.output(torch.fx.node.map_arg(graph.output_node().args[0], lambda a: env[a]))
    else:
        new.output(env[crossing_out[0]])
    out = torch.fx.GraphModule(gm, new)
    out.meta.update(gm.meta)
    out.meta["orca_pipeline"] = {"stage": stage, "num_stages": num_stages, "layers": (lo, hi)}
    _postcondition(out, lo, hi)
    out.graph.lint()
    out.recompile()
    return out


def _place(graph, cuts) -> dict:
    """Each call's stage: its layer's, the prelude's (stage 0) before the first layer, the
    epilogue's (the last) after it."""
    stage_of_layer = {}
    for s in range(len(cuts) - 1):
        for layer in range(cuts[s], cuts[s + 1]):
            stage_of_layer[layer] = s
    placement, seen_layer = {}, False
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        layer = layer_of(n)
        if layer is not None:
            seen_layer = True
            placement[n] = stage_of_layer[layer]
        else:
            placement[n] = len(cuts) - 2 if seen_layer else 0
    # a node after the layers that only feeds layer nodes (none in the families here) stays put
    return placement


def _position_only(graph) -> set:
    """Calls computed from graph inputs (not the caches) and weights alone: what a stage can
    recompute for itself (rotary tables, T's size, the embeddings: only stage 0 reads those)."""
    out = set()
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        inputs = n.all_input_nodes
        if all(a in out or a.op == "get_attr" or (a.op == "placeholder" and not _KV.match(a.target)) for a in inputs):
            if n.target is not ATTENTION:
                out.add(n)
    return out


def _postcondition(gm, lo, hi):
    layers = [n.meta.get("orca_layer") for n in gm.graph.find_nodes(op="call_function", target=ATTENTION)]
    if layers != list(range(lo, hi)):
        raise AssertionError(f"pipeline_stage: attention layers {layers}, expected {lo}..{hi - 1}")
