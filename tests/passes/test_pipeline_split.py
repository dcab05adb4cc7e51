"""pipeline_stage: each stage holds its layers (weights, attention, KV cache inputs), the residual
stream is the one tensor crossing a cut, and the stages run in a row give the whole graph's
logits (one process: stage outputs handed on by hand)."""
import pytest
import torch

from orca_compile.compiler import CompiledModel
from orca_compile.ops import ATTENTION
from orca_compile.passes.partition.pipeline_split import even_cuts, pipeline_stage
from orca_compile.runtime.batch import RaggedBatch
from orca_compile.runtime.kv_cache import new_kv_cache
from orca_compile.runtime.model_runner import run_graph
from tests.conftest import compiled_preset

FAMILIES = ["tiny-gpt2", "tiny-llama", "tiny-qwen2", "tiny-llama-mqa", "tiny-gemma2"]


def _weights(gm) -> dict:
    return {id(t): t for t in [*gm.parameters(), *gm.buffers()]}


@pytest.mark.parametrize("name", FAMILIES)
def test_stages_hold_their_layers_and_run_to_the_same_logits(name):
    model, cm = compiled_preset(name)
    layers = model.config.num_hidden_layers
    stages = [pipeline_stage(cm.graph_module, s, 2) for s in range(2)]
    for s, gm in enumerate(stages):
        atts = list(gm.graph.find_nodes(op="call_function", target=ATTENTION))
        lo, hi = gm.meta["orca_pipeline"]["layers"]
        assert [a.meta["orca_layer"] for a in atts] == list(range(lo, hi)) and hi - lo == layers // 2
        caches = [n.target for n in gm.graph.find_nodes(op="placeholder") if "cache" in n.target]
        assert caches == [f"{kv}_cache_{i}" for i in range(hi - lo) for kv in "kv"]
        names = [n.target for n in gm.graph.find_nodes(op="placeholder")]
        assert ("hidden" in names) == (s > 0) and ("logits_indices" in names) == (s == 1)
    # every weight of the whole graph sits in some stage; in both only the embedding (tied to the
    # LM head in GPT-2 and Gemma-2) and what the positions' tables are computed from (RoPE's
    # inverse frequencies: each stage recomputes its cos/sin rather than receive them)
    whole, first, second = _weights(cm.graph_module), _weights(stages[0]), _weights(stages[1])
    assert set(first) | set(second) == set(whole)
    shared = set(first) & set(second)
    assert all(whole[i].shape == model.get_input_embeddings().weight.shape or whole[i].dim() == 1 for i in shared)
    assert sum(t.numel() for i, t in whole.items()) <= sum(t.numel() for t in [*first.values(), *second.values()])

    parts = [CompiledModel(gm, {}, [], 0.0, cm.config, cm.model_class) for gm in stages]
    caches = [new_kv_cache(p, 8, 8) for p in parts]
    whole_cache = new_kv_cache(cm, 8, 8)
    batch = RaggedBatch.build([[5, 17, 3, 99, 4], [42, 7]], [0, 0], [[0], [1]], 8)
    hidden = run_graph(parts[0], batch, caches[0])
    assert hidden.shape == (7, model.config.hidden_size)
    got = run_graph(parts[1], batch, caches[1], hidden)
    want = run_graph(cm, batch, whole_cache)
    assert torch.equal(got, want)  # the same ops in the same order: bit for bit


def test_bad_stage_counts_are_refused():
    _, cm = compiled_preset("tiny-llama")  # 2 layers
    with pytest.raises(ValueError, match=r"pipeline_parallel_size must be an integer in \[1, 2\]"):
        pipeline_stage(cm.graph_module, 0, 3)
    with pytest.raises(ValueError, match=r"stage 2 is outside \[0, 2\)"):
        pipeline_stage(cm.graph_module, 2, 2)
    assert even_cuts(7, 3) == [0, 3, 5, 7]
