"""Structural invariants of each stage (passes/README.md)."""
import torch

from orca_compile.dump import expert_layers, layer_of
from orca_compile.ops import ATTENTION
from orca_compile.passes.split_attention import is_attention_softmax
from orca_compile.passes.manager import STAGES
from tests.conftest import compiled_preset

aten = torch.ops.aten
DENSE = {aten.linear.default, aten.addmm.default, aten.embedding.default, aten.layer_norm.default}


def _syms(val):
    return set().union(*(s.node.expr.free_symbols for s in val.shape if isinstance(s, torch.SymInt)))


def test_one_attention_per_layer_in_order(family):
    model, cm = compiled_preset(family)
    gm = cm.graph_module
    attn = list(gm.graph.find_nodes(op="call_function", target=ATTENTION))
    assert len(attn) == model.config.num_hidden_layers
    assert [n.meta["orca_layer"] for n in attn] == list(range(len(attn)))
    caches = [(n.args[3].target, n.args[4].target) for n in attn]
    assert caches == [(f"k_cache_{i}", f"v_cache_{i}") for i in range(len(attn))]


def test_no_sdpa_softmax_or_batch_dim_left(family):
    _, cm = compiled_preset(family)
    info = cm.graph_module.meta["orca"]
    for stage in ("flattened", "split", "pruned", "final"):
        for node in cm.stages[stage].graph.nodes:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                assert info.batch_symbol not in _syms(val), f"{stage}: {node.name} has the batch dim"
    softmaxes = []
    for node in cm.graph_module.graph.nodes:
        assert node.target is not aten.scaled_dot_product_attention.default, node.name
        if node.target in (aten.softmax.int, aten._softmax.default):
            assert not is_attention_softmax(node), f"{node.name}: an attention's softmax is left"
            softmaxes.append(node)
    # the only softmaxes left are the routers': one per mixture-of-experts layer, and nothing else
    routers = [layer for layer, _, _ in expert_layers(cm.graph_module)]
    assert sorted(layer_of(n) for n in softmaxes) == sorted(routers)


def test_dense_ops_work_on_flat_tokens(family):
    """Every dense op, from flatten_tokens on, sees [T, features] (or [N, features] for the head)."""
    _, cm = compiled_preset(family)
    info = cm.graph_module.meta["orca"]
    rows = {info.token_symbol, info.symbols["num_logits"]}
    for stage in ("flattened", "final"):
        dense = [n for n in cm.stages[stage].graph.nodes if n.target in DENSE]
        assert dense
        for node in dense:
            val = node.meta["val"]
            assert val.dim() == 2 and isinstance(val.shape[0], torch.SymInt), (stage, node.name, val.shape)
            assert val.shape[0].node.expr in rows, (stage, node.name, val.shape)
            for arg in node.all_input_nodes:  # not wrapped: no size-1 batch dim put back in front
                assert arg.target is not aten.unsqueeze.default or arg.args[1] != 0, (stage, node.name)


def test_every_stage_lints_and_mask_is_gone(family):
    _, cm = compiled_preset(family)
    assert set(cm.stages) == set(STAGES)
    for gm in cm.stages.values():
        gm.graph.lint()
    final = cm.graph_module.graph
    # HF's mask-building ops (index/cumsum/diff, comparisons) do not survive the cleanup
    for node in final.nodes:
        assert node.target not in (aten.index.Tensor, aten.cumsum.default, aten.diff.default, aten.le.Tensor), node.name
        if node.op == "call_function":
            assert node.users or node.is_impure(), f"{node.name} is dead"


def test_flattened_stage_runs_one_sequence_like_hf():
    """The intermediate stage is a runnable program too: [T] inputs, HF's own attention."""
    model, cm = compiled_preset("tiny-llama")
    ids = torch.tensor([5, 9, 2, 77, 31, 8])
    with torch.no_grad():
        got = cm.stages["flattened"](ids, torch.arange(6))
        want = model(input_ids=ids[None]).logits[0]
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_fast_and_verified_flatten_agree():
    """The fast metadata path of flatten_tokens gives the shapes the ops themselves compute."""
    from orca_compile.capture import capture
    from orca_compile.passes.flatten_tokens import flatten_tokens

    model, _ = compiled_preset("tiny-gpt2")
    fast = flatten_tokens(capture(model), verify=False)
    slow = flatten_tokens(capture(model), verify=True)
    shapes = lambda gm: [str(n.meta["val"].shape) for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    assert shapes(fast) == shapes(slow)


def test_prune_logits_selects_rows_before_the_head(family):
    _, cm = compiled_preset(family)
    out = cm.graph_module.graph.output_node().args[0]
    node = out
    while node.target not in (aten.linear.default,):
        node = node.all_input_nodes[0]
    assert node.args[0].target is aten.index_select.default
    assert node.args[0].args[2].target == "logits_indices"


def test_compiled_model_holds_no_hf_module():
    """The engine runs the rewritten graph only: no HF module is reachable from the result
    (parameters are shared tensors, not modules)."""
    from transformers import PreTrainedModel

    _, cm = compiled_preset("tiny-llama")
    seen, stack = set(), [cm.graph_module, *cm.stages.values(), cm.graph_module.meta["orca"]]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        assert not isinstance(obj, PreTrainedModel)
        if isinstance(obj, torch.nn.Module):
            stack.extend(obj.children())
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            stack.extend(v for v in vars(obj).values() if isinstance(v, (torch.nn.Module, dict)) or hasattr(v, "module_paths"))
        if isinstance(obj, dict):
            stack.extend(v for v in obj.values() if isinstance(v, torch.nn.Module))
    for node in cm.graph_module.graph.nodes:
        assert node.op != "call_module", node.name
