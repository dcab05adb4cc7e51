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
