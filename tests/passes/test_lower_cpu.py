"""lower_cpu: packed oneDNN linears with fused activations, against the unlowered graph and HF.

Tolerances (float32, oneDNN has no float64 kernels): the packed GEMM sums in another order than
MKL's, ~1e-7 relative per output; on these tiny models the logits differ by at most ~3e-7 from
the unlowered graph (seen), and tanh-GELU's epilogue by ~4e-6 before the next layer. 2e-5 on
logits of magnitude ~1 is ten times that and far below what a wrong weight orientation, a missing
bias or a wrong activation gives (>1e-2).
"""
import pytest
import torch
import torch.fx

import orca_compile
from orca_compile.passes import lower_cpu
from orca_compile.presets import load_model
from orca_compile.runtime.batch import RaggedBatch
from tests.conftest import FAMILIES

aten = torch.ops.aten
pytestmark = pytest.mark.skipif(not lower_cpu.available(), reason="torch built without oneDNN")

# the activation each family's MLP computes, as the pass must recognise it
ACTIVATION = {"tiny-gpt2": "gelu/tanh", "tiny-gemma2": "gelu/tanh", "tiny-gpt-neox": "gelu/none", "tiny-opt": "relu",
              "tiny-llama": "swish", "tiny-qwen2": "swish", "tiny-mistral": "swish", "tiny-llama-mqa": "swish"}
_CACHE = {}


def _float32(name):
    if name not in _CACHE:
        model = load_model(name, dtype=torch.float32)
        _CACHE[name] = (model, orca_compile.compile(model, keep_stages=False))
    return _CACHE[name]


def _matmuls_on_weights(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and n.target in (aten.addmm.default, aten.linear.default, aten.mm.default)]


@pytest.mark.parametrize("name", FAMILIES)
def test_every_linear_is_packed_and_the_activation_fused(name):
    model, cm = _float32(name)
    before = len(_matmuls_on_weights(cm.graph_module))
    lowered = lower_cpu.lower_cpu(cm.graph_module)
    packed = list(lowered.graph.find_nodes(op="call_function", target=lower_cpu.PACKED_LINEAR))
    assert not _matmuls_on_weights(lowered)
    assert len(packed) == before
    layers = model.config.num_hidden_layers
    assert lowered.meta["orca_lowering"]["fused_activations"] == {ACTIVATION[name]: layers}
    assert sum(n.args[3] != "none" for n in packed) == layers
    # the input graph is untouched: the runtime's other backends and the dumps still use it
    assert len(_matmuls_on_weights(cm.graph_module)) == before


def _logits(gm, cm, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, cm.vocab_size, (n,), generator=g).tolist() for n in (9, 3, 17)]
    tables = [[0, 1], [2], [3, 4]]
    batch = RaggedBatch.build(prompts, [0, 0, 0], tables, 16, all_logits=True)
    return gm(*cm.inputs(batch, cm.new_kv_cache(8, 16))), prompts


@pytest.mark.parametrize("name", FAMILIES)
def test_lowered_logits_match_the_graph_and_hf(name):
    model, cm = _float32(name)
    lowered = lower_cpu.lower_cpu(cm.graph_module)
    with torch.no_grad():
        want, prompts = _logits(cm.graph_module, cm)
        got, _ = _logits(lowered, cm)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
        hf = torch.cat([model(torch.tensor([p])).logits[0] for p in prompts])
    torch.testing.assert_close(got, hf, atol=2e-5, rtol=0)


# ------------------------------------------------------------------------------ activation recognition

def _graph(chain):
    """x -> linear(x, W, b) -> chain(y) -> linear2 -> out, as an ATen fx graph with get_attr weights."""
    root = torch.nn.Module()
    g = torch.Generator().manual_seed(0)
    root.w = torch.randn(16, 8, generator=g)
    root.b = torch.randn(16, generator=g)
    root.w2 = torch.randn(4, 16, generator=g)
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_function(aten.linear.default, (x, graph.get_attr("w"), graph.get_attr("b")))
    z = chain(graph, y)
    out = graph.call_function(aten.linear.default, (z, graph.get_attr("w2")))
    graph.output(out)
    gm = torch.fx.GraphModule(root, graph)
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(gm).propagate(torch.randn(5, 8))
    for n in gm.graph.nodes:  # lower_cpu reads shapes from meta["val"], as the compiler leaves them
        if "tensor_meta" in n.meta:
            n.meta["val"] = torch.empty(n.meta["tensor_meta"].shape, dtype=n.meta["tensor_meta"].dtype)
    return gm


def _gelu_new(graph, y):  # GPT-2's eight ops
    c = graph.call_function
    half = c(aten.mul.Tensor, (y, 0.5))
    cube = c(aten.mul.Tensor, (c(aten.pow.Tensor_Scalar, (y, 3.0)), 0.044715))
    inner = c(aten.mul.Tensor, (c(aten.add.Tensor, (y, cube)), 0.7978845608028654))
    return c(aten.mul.Tensor, (half, c(aten.add.Tensor, (c(aten.tanh.default, (inner,)), 1.0))))


def _silu_by_hand(graph, y):
    return graph.call_function(aten.mul.Tensor, (y, graph.call_function(aten.sigmoid.default, (y,))))


def _square_plus_one(graph, y):  # not an activation oneDNN has
    return graph.call_function(aten.add.Tensor, (graph.call_function(aten.mul.Tensor, (y, y)), 1.0))


def _gelu_with_wrong_constant(graph, y):
    c = graph.call_function
    half = c(aten.mul.Tensor, (y, 0.5))
    cube = c(aten.mul.Tensor, (c(aten.pow.Tensor_Scalar, (y, 3.0)), 0.045))
    inner = c(aten.mul.Tensor, (c(aten.add.Tensor, (y, cube)), 0.7978845608028654))
    return c(aten.mul.Tensor, (half, c(aten.add.Tensor, (c(aten.tanh.default, (inner,)), 1.0))))


def _relu_and_raw_output_both_used(graph, y):  # y is needed un-activated too: nothing to fuse
    return graph.call_function(aten.add.Tensor, (graph.call_function(aten.relu.default, (y,)), y))


@pytest.mark.parametrize("chain,fused", [
    (_gelu_new, {"gelu/tanh": 1}), (_silu_by_hand, {"swish": 1}),
    (lambda g, y: g.call_function(aten.gelu.default, (y,)), {"gelu/none": 1}),
    (lambda g, y: g.call_function(aten.relu.default, (y,)), {"relu": 1}),
    (_square_plus_one, {}), (_gelu_with_wrong_constant, {}), (_relu_and_raw_output_both_used, {}),
])
def test_activation_is_recognised_by_evaluation(chain, fused):
    gm = _graph(chain)
    x = torch.randn(5, 8)
    want = gm(x)
    lowered = lower_cpu.lower_cpu(gm)
    assert lowered.meta["orca_lowering"]["fused_activations"] == fused
    assert not _matmuls_on_weights(lowered)
    torch.testing.assert_close(lowered(x), want, atol=1e-4, rtol=1e-5)
    left = [n for n in lowered.graph.nodes if n.op == "call_function" and n.target is not lower_cpu.PACKED_LINEAR]
    assert (not left) == bool(fused)  # a fused chain leaves nothing behind; an unfused one stays whole


def test_float64_or_no_linear_is_refused():
    _, cm = _float32("tiny-llama")
    assert lower_cpu.applies(cm.graph_module)
    model64 = load_model("tiny-llama", dtype=torch.float64)
    cm64 = orca_compile.compile(model64, keep_stages=False)
    assert not lower_cpu.applies(cm64.graph_module)
    with pytest.raises(ValueError, match="torch.float64 on cpu"):
        lower_cpu.lower_cpu(cm64.graph_module)


# ------------------------------------------------------------------------------ the engine's backend

def test_engine_auto_backend_is_onednn_in_float32_and_eager_in_float64():
    _, cm = _float32("tiny-llama")
    assert orca_compile.optimize(cm, num_kv_blocks=16).backend == "onednn"
    assert orca_compile.optimize(cm, num_kv_blocks=16, backend="eager").backend == "eager"
    cm64 = orca_compile.compile(load_model("tiny-llama", dtype=torch.float64), keep_stages=False)
    assert orca_compile.optimize(cm64, num_kv_blocks=16).backend == "eager"
    with pytest.raises(ValueError, match="backend='onednn' cannot apply: it needs float32 weights on the CPU; this model has torch.float64 on cpu"):
        orca_compile.optimize(cm64, num_kv_blocks=16, backend="onednn")


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-opt"])
def test_onednn_engine_gives_the_eager_engines_tokens(name):
    # Greedy in float32 on both backends. The logits differ by ~1e-7 (above); random tiny models
    # have top-2 gaps of ~1e-2, so a flipped argmax would mean a real bug, not rounding.
    _, cm = _float32(name)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, cm.vocab_size, (n,), generator=g).tolist() for n in (5, 23, 12, 40)]
    params = orca_compile.SamplingParams(max_tokens=12, ignore_eos=True, logprobs=True)
    outs = {b: orca_compile.optimize(cm, num_kv_blocks=32, backend=b, max_num_batched_tokens=32).generate(prompts, params)
            for b in ("eager", "onednn")}
    for a, b in zip(outs["eager"], outs["onednn"]):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 2e-5
