"""The graph-derived FLOP count against one computed from the HF model's own weights, on the
portable graph and on every lowering of it (one source of FLOPs for any stage)."""
import pytest

import orca_compile
from orca_compile.passes import lower_cpu
from orca_compile.passes.partition.cost_model import graph_cost
from tests.conftest import compiled_preset

KERNELS = [k for k in ("orca", "onednn") if lower_cpu.available(k)]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-llama-mqa"])
def test_matmul_flops_equal_two_per_weight_per_token(name):
    model, cm = compiled_preset(name)
    head = model.get_output_embeddings().weight
    body = sum(p.numel() for n, p in model.named_parameters()
               if p.dim() == 2 and p is not head and "embed" not in n and "wte" not in n and "wpe" not in n)
    cost = graph_cost(cm.graph_module)
    # 7 tokens through the body, logits for 3 of them, no attention pairs
    assert cost.flops(7, 3, 0) == 2 * body * 7 + 2 * head.numel() * 3
    cfg = model.config
    heads, hd = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    assert cost.attention_flops_per_key == cfg.num_hidden_layers * 2 * heads * 2 * hd
    assert cost.flops(0, 0, 10) == 10 * cost.attention_flops_per_key


def test_experts_cost_two_flops_per_weight_per_token_and_routed_expert():
    """Mixtral: each token runs its top-k experts' three projections (gate and up fused, down);
    the router is a linear like the others."""
    model, cm = compiled_preset("tiny-mixtral")
    cfg = model.config
    head = model.get_output_embeddings().weight
    dense = sum(p.numel() for n, p in model.named_parameters()
                if p.dim() == 2 and p is not head and "embed" not in n)
    per_expert = 3 * cfg.hidden_size * cfg.intermediate_size
    experts = cfg.num_hidden_layers * cfg.num_experts_per_tok * per_expert
    assert graph_cost(cm.graph_module).flops(7, 3, 0) == 2 * (dense + experts) * 7 + 2 * head.numel() * 3


@pytest.mark.skipif(not KERNELS, reason="neither the C GEMM (needs a C compiler) nor oneDNN is available")
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_a_lowered_graph_costs_what_the_portable_one_does(name):
    from orca_compile.presets import load_model

    fp32 = load_model(name, dtype="float32")
    portable = orca_compile.compile(fp32)
    want = graph_cost(portable.graph_module)
    for backend in [{"orca": "cpu", "onednn": "onednn"}[k] for k in KERNELS]:
        lowered = orca_compile.lower(portable, backend)
        assert lowered.graph_module is not portable.graph_module
        got = graph_cost(lowered.graph_module)
        assert got.flops(7, 3, 11) == want.flops(7, 3, 11) > 0
        assert got.attention_flops_per_key == want.attention_flops_per_key > 0


def test_bytes_communication_and_the_prediction_add_up():
    import sympy

    from orca_compile.passes.partition.cost_model import Machine
    from orca_compile.passes.partition.tensor_parallel import tensor_parallel

    model, cm = compiled_preset("tiny-llama")  # float64
    cost = graph_cost(cm.graph_module)
    linear_weights = [p for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n]
    assert cost.weight_bytes == sum(p.numel() * 8 for p in linear_weights)
    cfg = model.config
    kv_heads, hd = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    assert cost.attention_bytes_per_key == cfg.num_hidden_layers * kv_heads * 2 * hd * 8
    assert cost.num_collectives == 0 and cost.comm_bytes == 0 and cost.world_size == 1
    assert cost.activation_bytes.free_symbols <= {cost.tokens, cost.logits_rows}
    machine = Machine(flops_per_second=1e9, memory_bytes_per_second=1e8, op_overhead_seconds=1e-6)
    got = cost.predict_seconds(machine, 7, 3, 20, 9)
    assert got["compute"] == pytest.approx(cost.flops(7, 3, 20) / 1e9)
    want_memory = (cost.weight_bytes + 9 * cost.attention_bytes_per_key
                   + 2 * float(cost.activation_bytes.subs({cost.tokens: 7, cost.logits_rows: 3}))) / 1e8
    assert got["memory"] == pytest.approx(want_memory)
    assert got["total"] == pytest.approx(max(got["compute"], got["memory"]) + cost.num_ops * 1e-6)

    shard = graph_cost(tensor_parallel(cm.graph_module, 0, 2))
    assert shard.world_size == 2 and shard.num_collectives == 2 * cfg.num_hidden_layers
    assert sympy.simplify(shard.comm_bytes - 2 * cfg.num_hidden_layers * shard.tokens * cfg.hidden_size * 8) == 0
    assert shard.weight_bytes < cost.weight_bytes
    with pytest.raises(ValueError, match="link_bytes_per_second > 0"):
        shard.predict_seconds(machine, 7, 3, 20, 9)
    linked = Machine(1e9, 1e8, link_bytes_per_second=1e7, link_latency_seconds=1e-5)
    comm = shard.predict_seconds(linked, 7, 3, 20, 9)["communication"]
    assert comm == pytest.approx(2 * 1 / 2 * 2 * cfg.num_hidden_layers * 7 * cfg.hidden_size * 8 / 1e7
                                 + 2 * cfg.num_hidden_layers * 2 * 1e-5)
