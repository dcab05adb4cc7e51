"""tensor_parallel: each rank's shard of the final graph, found from the dataflow.

Structure in one process (heads, caches, all-reduces, weight bytes, the refusals, HF's own
``base_model_tp_plan``). The numerics, two ranks as real processes over gloo against HF and the
one-process engine, are in tests/runtime/test_multiproc.py."""
from __future__ import annotations

import re

import pytest
import torch

from orca_compile.ops import ALL_REDUCE, ATTENTION
from orca_compile.passes.partition.tensor_parallel import tensor_parallel
from tests.conftest import compiled_preset

FAMILIES = ["tiny-gpt2", "tiny-llama", "tiny-qwen2", "tiny-llama-mqa", "tiny-gemma2"]
TP = 2


def _bytes(gm) -> int:
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in
                                                      [*gm.parameters(), *gm.buffers()]}.values())


@pytest.mark.parametrize("name", FAMILIES)
def test_each_rank_holds_its_heads_its_shard_and_the_all_reduces(name):
    model, cm = compiled_preset(name)
    cfg = model.config
    nh = cfg.num_attention_heads
    nkv = getattr(cfg, "num_key_value_heads", None) or nh
    layers = cfg.num_hidden_layers
    shards = [tensor_parallel(cm.graph_module, r, TP) for r in range(TP)]
    for gm in shards:
        atts = list(gm.graph.find_nodes(op="call_function", target=ATTENTION))
        assert len(atts) == layers
        for att in atts:
            assert att.args[0].meta["val"].shape[1] == nh // TP
            kept = max(1, nkv // TP)  # fewer KV heads than ranks: one each, replicated
            assert att.args[1].meta["val"].shape[1] == att.args[2].meta["val"].shape[1] == kept
            assert att.args[3].meta["val"].shape[2] == att.args[4].meta["val"].shape[2] == kept
        # two all-reduces a layer: after the attention's output projection and the MLP's down one
        assert len(list(gm.graph.find_nodes(op="call_function", target=ALL_REDUCE))) == 2 * layers
        assert gm.meta["orca_partition"]["row_parallel"] == 2 * layers
        logits = gm.graph.output_node().args[0].meta["val"]
        assert logits.shape[-1] == cfg.vocab_size  # the replicated head: full logits on every rank
    # weight bytes: every rank holds the replicated weights and 1/TP of the sharded ones (KV
    # projections replicated where there are fewer KV heads than ranks)
    whole = _bytes(cm.graph_module)
    per_rank = [_bytes(gm) for gm in shards]
    assert per_rank[0] == per_rank[1] < whole
    sharded = _sharded_bytes(model)
    kv_extra = 0
    if nkv < TP:  # each rank keeps a whole KV head: the K and V projections are not halved
        kv = [p for n, p in model.named_parameters() if re.search(r"\.(k_proj|v_proj)\.", n)]
        kv_extra = sum(p.numel() * p.element_size() for p in kv) // TP
    assert per_rank[0] == whole - sharded + sharded // TP + kv_extra


def _sharded_bytes(model) -> int:
    """Bytes of the weights the ranks split: every linear's weight but the LM head's, and the
    biases of column-parallel linears (a row-parallel one's bias is added once, after the sum,
    so every rank keeps it whole, like the embeddings, the norms and the LM head)."""
    head = model.get_output_embeddings().weight
    total = 0
    for name, p in model.named_parameters():  # named_parameters yields a tied weight once
        sharded = (p.dim() == 2 and p is not head and not re.search(r"embed|wte|wpe", name)) or (
            p.dim() == 1 and re.search(r"(q_proj|k_proj|v_proj|c_attn|c_fc|fc1|gate_proj|up_proj)\.bias", name))
        if sharded:
            total += p.numel() * p.element_size()
    return total


def test_a_count_that_does_not_divide_is_refused_by_name():
    _, cm = compiled_preset("tiny-llama")  # 4 query heads, 2 KV heads
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 does not divide the 4 query heads of attention"):
        tensor_parallel(cm.graph_module, 0, 3)
    with pytest.raises(ValueError, match=r"rank 2 is outside \[0, 2\)"):
        tensor_parallel(cm.graph_module, 2, 2)
    with pytest.raises(ValueError, match="tensor_parallel_size must be an integer >= 1"):
        tensor_parallel(cm.graph_module, 0, 0)


def test_the_split_agrees_with_transformers_own_tp_plan():
    """Llama's config carries HF's ``base_model_tp_plan`` (module pattern -> colwise / rowwise):
    the pass, which reads the dataflow only, must reach the same split."""
    model, cm = compiled_preset("tiny-llama")
    plan = model.config.base_model_tp_plan
    assert plan, "this Transformers' LlamaConfig has no base_model_tp_plan"
    gm = tensor_parallel(cm.graph_module, 0, TP)
    found = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (torch.ops.aten.linear.default, torch.ops.aten.mm.default):
            continue
        path = _module_path(node)
        if not path.startswith("model.layers."):
            continue
        pattern = re.sub(r"^model\.layers\.\d+\.", "layers.*.", path)
        row = any(u.target is ALL_REDUCE for u in node.users)
        found[pattern] = "rowwise" if row else "colwise"
    want = {k: v.replace("_rep", "").replace("local_", "") for k, v in plan.items() if k.startswith("layers.*.")
            and k.endswith("proj")}
    assert found == want


def _module_path(node) -> str:
    from orca_compile.passes.graph_utils import clean_module_path

    stack = node.meta.get("nn_module_stack") or {}
    path, _ = list(stack.values())[-1]
    return clean_module_path(path)
