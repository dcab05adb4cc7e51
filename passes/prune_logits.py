"""prune_logits: compute the LM head only for the tokens whose logits are wanted.

Requires: ``flatten_tokens`` (the LM head is a ``linear`` on ``[T, hidden]``).
Ensures: a new input ``logits_indices`` ([N] int64); the LM head's input is
``index_select(hidden, 0, logits_indices)``; the graph returns ``[N, vocab]``.

In a prefill only the last token of each request is sampled, so the LM head (often the largest
matmul of the model: 768 x 50257 for GPT-2) runs on N = number of requests rows instead of T.

Before / after::

    linear_14: f32[T, 128] = aten.linear(mul_40, lm_head_weight); return linear_14
  ->
    index_select: f32[N, 64] = aten.index_select(mul_40, 0, logits_indices)
    linear_14: f32[N, 128] = aten.linear(index_select, lm_head_weight); return linear_14
"""
from __future__ import annotations

import torch
import torch.fx

from orca_compile.passes.graph_utils import new_symint

aten = torch.ops.aten


def prune_logits(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    graph = gm.graph
    info = gm.meta["orca"]
    out = graph.output_node()
    tokens = info.token_symbol
    chain, node = [], out.args[0]
    # walk back over position-wise ops on [T, vocab] (soft-capping, casts) to the LM head
    while node.target is not aten.linear.default:
        inputs = [a for a in node.all_input_nodes if _rows(a) == tokens]
        if len(inputs) != 1 or _rows(node) != tokens:
            raise ValueError(f"prune_logits: cannot find the LM head behind {node.name} ({node.target})")
        chain.append(node)
        node = inputs[0]
    head = node
    hidden = head.args[0]
    if _rows(hidden) != tokens or hidden.meta["val"].dim() != 2:
        raise ValueError(f"prune_logits: LM head input {hidden.name} is not [T, hidden]")
    fake_mode = torch._guards.detect_fake_mode([hidden.meta["val"]])
    num_logits = new_symint(fake_mode.shape_env, "num_logits", 3)
    info.symbols["num_logits"] = num_logits.node.expr
    last = list(graph.find_nodes(op="placeholder"))[-1]
    with graph.inserting_after(last):
        indices = graph.placeholder("logits_indices")
    with fake_mode:
        indices.meta["val"] = torch.empty(num_logits, dtype=torch.long, device=hidden.meta["val"].device)
    with graph.inserting_before(head):
        selected = graph.call_function(aten.index_select.default, (hidden, 0, indices))
    selected.meta.update({k: v for k, v in head.meta.items() if k != "val"})
    head.replace_input_with(hidden, selected)
    with fake_mode:
        for node in [selected, head, *reversed(chain)]:
            vals = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta["val"])
            node.meta["val"] = node.target(*vals[0], **vals[1])
    _postcondition(gm, head, num_logits.node.expr)
    gm.recompile()
    return gm


def _rows(node):
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() == 0 or not isinstance(val.shape[0], torch.SymInt):
        return None
    return val.shape[0].node.expr


def _postcondition(gm, head, num_logits):
    assert head.args[0].target is aten.index_select.default, "prune_logits: LM head input is not selected"
    assert _rows(gm.graph.output_node().args[0]) == num_logits, "prune_logits: output is not [N, vocab]"
    gm.graph.lint()
