"""lower_cpu: linears on packed weights with fused activations (the C GEMM, ``kernel="orca"``, and
oneDNN), against the unlowered graph and HF.

Tolerances. float32: a packed GEMM sums in another order than MKL's, ~1e-7 relative per output; on
these tiny models the logits differ by at most ~3e-7 from the unlowered graph (seen), and a fused
tanh-GELU epilogue by ~4e-6 before the next layer. 2e-5 on logits of magnitude ~1 is ten times
that and far below what a wrong weight orientation, a missing bias or a wrong activation gives
(>1e-2). float64 (the C GEMM only; oneDNN has no float64 kernels): summation order alone, 1e-10.
"""
import pytest
import torch
import torch.fx

import orca_compile
from orca_compile.kernels import attention_cpu, gemm_cpu, norm_cpu, rope_cpu
from orca_compile.ops import ATTENTION, EXPERT_LINEAR
from orca_compile.passes import lower_cpu
from orca_compile.presets import load_model
from orca_compile.runtime.batch import RaggedBatch
from orca_compile.runtime.kv_cache import new_kv_cache
from orca_compile.runtime.model_runner import graph_inputs
from tests.conftest import FAMILIES, hf_oracle

aten = torch.ops.aten
NEEDS = {"orca": pytest.mark.skipif(not gemm_cpu.available(), reason=f"C GEMM: {gemm_cpu.why_unavailable()}"),
         "onednn": pytest.mark.skipif(not lower_cpu.available("onednn"), reason="torch built without oneDNN")}
KERNELS = [pytest.param(k, marks=m) for k, m in NEEDS.items()]
LINEAR = {"orca": gemm_cpu.linear, "onednn": lower_cpu.PACKED_LINEAR}

# the activation each family's MLP computes, as the pass must recognise it
ACTIVATION = {"tiny-gpt2": "gelu_tanh", "tiny-gemma2": "gelu_tanh", "tiny-gpt-neox": "gelu", "tiny-opt": "relu",
              "tiny-llama": "silu", "tiny-qwen2": "silu", "tiny-mistral": "silu", "tiny-llama-mqa": "silu",
              "tiny-qwen2-moe": "silu", "tiny-bloom": "gelu_tanh",
              # experts only: their activation runs between two orca.expert_linear ops, not after a linear
              "tiny-mixtral": None, "tiny-gpt-oss": None}
# dense MLPs where a family has other than one a layer: Qwen2-MoE's layer 0 has experts and a
# shared expert (an MLP), its layer 1 a dense MLP
DENSE_MLPS = {"tiny-mixtral": 0, "tiny-gpt-oss": 0}
# other linears with a fused activation: the sigmoid gate of Qwen2-MoE's shared expert
OTHER_FUSIONS = {"tiny-qwen2-moe": {"sigmoid": 1}}
FUSES = {"orca": {"gelu_tanh", "silu", "relu", "sigmoid"},
         "onednn": {"gelu_tanh", "gelu", "silu", "relu", "sigmoid", "tanh"}}
_CACHE = {}


def _compiled(name, dtype=torch.float32):
    if (name, dtype) not in _CACHE:
        model = hf_oracle(load_model(name, dtype=dtype))
        _CACHE[name, dtype] = (model, orca_compile.compile(model, keep_stages=False))
    return _CACHE[name, dtype]


def _fused_flag(node, kernel):
    return node.args[4] != 0 if kernel == "orca" else node.args[3] != "none"


def _matmuls_on_weights(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and n.target in (aten.addmm.default, aten.linear.default, aten.mm.default)]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("name", FAMILIES)
def test_every_linear_is_packed_and_the_activation_fused(name, kernel):
    model, cm = _compiled(name)
    before = len(_matmuls_on_weights(cm.graph_module))
    lowered = lower_cpu.lower_cpu(cm.graph_module, kernel=kernel)
    packed = list(lowered.graph.find_nodes(op="call_function", target=LINEAR[kernel]))
    assert not _matmuls_on_weights(lowered)
    assert len(packed) == before
    layers = model.config.num_hidden_layers
    mlps = DENSE_MLPS.get(name, layers)
    fused = ACTIVATION[name] in FUSES[kernel] and mlps > 0
    want = ({ACTIVATION[name]: mlps} if fused else {}) | OTHER_FUSIONS.get(name, {})
    assert lowered.meta["orca_lowering"]["fused_activations"] == want
    assert sum(_fused_flag(n, kernel) for n in packed) == sum(want.values())
    # the experts' weights stored [E, out, in] are laid out [E, in, out] once (read row after row)
    experts = list(cm.graph_module.graph.find_nodes(op="call_function", target=EXPERT_LINEAR))
    assert lowered.meta["orca_lowering"]["experts_laid_out"] == len({n.args[2].target for n in experts
                                                                       if not n.args[4]})
    assert all(n.args[4] for n in lowered.graph.find_nodes(op="call_function", target=EXPERT_LINEAR))
    # the C kernel's lowering also calls the C attention directly, skipping the op's dispatch
    direct = layers if kernel == "orca" and attention_cpu.available() else 0
    assert lowered.meta["orca_lowering"]["direct_attention"] == direct
    assert len(list(lowered.graph.find_nodes(op="call_function", target=attention_cpu.attention))) == direct
    assert len(list(lowered.graph.find_nodes(op="call_function", target=ATTENTION))) == layers - direct
    # the C kernel's lowering turns every layer norm (with the residual add that feeds it, where one
    # does) into one add_layer_norm call; RMSNorm's ATen ops stay (their fusion did not pay its way)
    def count(gm, target):
        return len(list(gm.graph.find_nodes(op="call_function", target=target)))

    norms, rms = count(cm.graph_module, aten.layer_norm.default), count(cm.graph_module, aten.rsqrt.default)
    fused_norms = list(lowered.graph.find_nodes(op="call_function", target=norm_cpu.add_layer_norm))
    assert count(lowered, aten.rsqrt.default) == rms
    if kernel == "orca" and norm_cpu.available():
        assert len(fused_norms) == lowered.meta["orca_lowering"]["fused_norms"] == norms
        assert count(lowered, aten.layer_norm.default) == 0
        if name == "tiny-gpt2":  # ln_1, ln_2 per layer and ln_f, each fed by a residual add
            assert norms == 2 * layers + 1 and all(n.args[1] is not None for n in fused_norms)
            assert count(lowered, aten.add.Tensor) == 0
    else:
        assert not fused_norms
    # and every rotary embedding of a query or key into one rope_cpu.rotate call
    rotations = list(lowered.graph.find_nodes(op="call_function", target=rope_cpu.rotate))
    if kernel == "orca" and rope_cpu.available():
        # GPT-OSS rotates the two halves without HF's rotate_half (its own cat of two products), Bloom has ALiBi
        rope_families = ("tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-llama-mqa", "tiny-gemma2", "tiny-gpt-neox",
                         "tiny-mixtral", "tiny-qwen2-moe")
        assert len(rotations) == lowered.meta["orca_lowering"]["fused_rope"] == (2 * layers if name in rope_families else 0)
        assert count(lowered, aten.neg.default) == 0
    else:
        assert not rotations
    # every weight is read through a flat alias in the module's own dict (one lookup, not a walk
    # through the submodules' __getattr__ at each level)
    targets = [n.target for n in lowered.graph.find_nodes(op="get_attr")]
    assert targets and all("." not in t and isinstance(vars(lowered).get(t), torch.Tensor) for t in targets)
    assert lowered.meta["orca_lowering"]["flat_attributes"] == len(set(targets))
    assert "getattr(" not in lowered.code and "self.model" not in lowered.code and "self.transformer" not in lowered.code
    # the input graph is untouched: the runtime's other backends and the dumps still use it
    assert len(_matmuls_on_weights(cm.graph_module)) == before


def _logits(gm, cm, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, cm.vocab_size, (n,), generator=g).tolist() for n in (9, 3, 17)]
    tables = [[0, 1], [2], [3, 4]]
    batch = RaggedBatch.build(prompts, [0, 0, 0], tables, 16, all_logits=True)
    return gm(*graph_inputs(cm, batch, new_kv_cache(cm, 8, 16))), prompts


@pytest.mark.parametrize("kernel,dtype", [pytest.param(k, d, marks=NEEDS[k]) for k, d in
                                          (("orca", torch.float32), ("orca", torch.float64), ("onednn", torch.float32))])
@pytest.mark.parametrize("name", FAMILIES)
def test_lowered_logits_match_the_graph_and_hf(name, kernel, dtype):
    model, cm = _compiled(name, dtype)
    lowered = lower_cpu.lower_cpu(cm.graph_module, kernel=kernel)
    tol = 2e-5 if dtype == torch.float32 else 1e-10
    with torch.no_grad():
        want, prompts = _logits(cm.graph_module, cm)
        got, _ = _logits(lowered, cm)
        torch.testing.assert_close(got, want, atol=tol, rtol=0)
        hf = torch.cat([model(torch.tensor([p])).logits[0] for p in prompts])
    # HF's Gemma2 RMSNorm computes in float32 (x.float()) even in a float64 model, so the graph is
    # ~1e-7 from HF there already; the lowering must not move it further than tol
    torch.testing.assert_close(got, hf, atol=tol + float((want - hf).abs().max()), rtol=0)


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


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("chain,activation", [
    (_gelu_new, "gelu_tanh"), (_silu_by_hand, "silu"),
    (lambda g, y: g.call_function(aten.gelu.default, (y,)), "gelu"),
    (lambda g, y: g.call_function(aten.relu.default, (y,)), "relu"),
    (lambda g, y: g.call_function(aten.tanh.default, (y,)), "tanh"),
    (_square_plus_one, None), (_gelu_with_wrong_constant, None), (_relu_and_raw_output_both_used, None),
])
def test_activation_is_recognised_by_evaluation(chain, activation, kernel):
    gm = _graph(chain)
    x = torch.randn(5, 8)
    want = gm(x)
    lowered = lower_cpu.lower_cpu(gm, kernel=kernel)
    fused = {activation: 1} if activation in FUSES[kernel] else {}
    assert lowered.meta["orca_lowering"]["fused_activations"] == fused
    assert not _matmuls_on_weights(lowered)
    torch.testing.assert_close(lowered(x), want, atol=1e-4, rtol=1e-5)
    left = [n for n in lowered.graph.nodes if n.op == "call_function" and n.target is not LINEAR[kernel]]
    assert (not left) == bool(fused)  # a fused chain leaves nothing behind; an unfused one stays whole


@pytest.mark.parametrize("kernel", KERNELS)
def test_one_weight_used_in_both_orientations_is_packed_twice(kernel):
    # a square weight as linear(x, W) (x W^T) and as mm(y, W) (y W): two different products, so
    # two packed copies; one copy for both would give the second product silently wrong
    root = torch.nn.Module()
    root.w = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_function(aten.linear.default, (x, graph.get_attr("w")))
    z = graph.call_function(aten.mm.default, (y, graph.get_attr("w")))
    graph.output(z)
    gm = torch.fx.GraphModule(root, graph)
    x = torch.randn(3, 8)
    lowered = lower_cpu.lower_cpu(gm, kernel=kernel)
    assert lowered.meta["orca_lowering"]["packed_weights"] == 2
    torch.testing.assert_close(lowered(x), gm(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS[:1])
def test_a_bias_the_kernel_cannot_read_is_added_after(kernel):
    # a bias computed in the graph (not a weight): the C kernel adds none itself, an add follows,
    # and the activation after it is not fused (it must see the biased value)
    gm = _graph(lambda g, y: g.call_function(aten.relu.default, (y,)))
    lin = next(n for n in gm.graph.nodes if n.target is aten.linear.default)
    with gm.graph.inserting_before(lin):
        doubled = gm.graph.call_function(aten.mul.Tensor, (lin.args[2], 2.0))
    lin.args = (lin.args[0], lin.args[1], doubled)
    gm.recompile()
    x = torch.randn(5, 8)
    lowered = lower_cpu.lower_cpu(gm, kernel=kernel)
    assert lowered.meta["orca_lowering"]["fused_activations"] == {}
    assert any(n.target is aten.add.Tensor for n in lowered.graph.nodes)
    torch.testing.assert_close(lowered(x), gm(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_dtypes_each_kernel_takes(kernel):
    assert lower_cpu.applies(_compiled("tiny-llama")[1].graph_module, kernel)
    gm64 = _compiled("tiny-llama", torch.float64)[1].graph_module
    if kernel == "orca":
        assert lower_cpu.applies(gm64, kernel)
    else:
        assert lower_cpu.unmet(gm64, kernel) == "it needs float32 weights on the CPU; this model has torch.float64 on cpu"
        with pytest.raises(ValueError, match="torch.float64 on cpu"):
            lower_cpu.lower_cpu(gm64, kernel=kernel)
    gm16 = _compiled("tiny-llama", torch.bfloat16)[1].graph_module
    with pytest.raises(ValueError, match="this model has torch.bfloat16 on cpu"):
        lower_cpu.lower_cpu(gm16, kernel=kernel)
    with pytest.raises(ValueError, match="kernel='mkl': expected one of orca, onednn"):
        lower_cpu.lower_cpu(gm64, kernel="mkl")


# ------------------------------------------------------------------------------ the engine's backend

@pytest.mark.skipif(not (gemm_cpu.available() and lower_cpu.available("onednn")), reason="needs both kernels")
def test_engine_auto_backend(monkeypatch):
    _, cm = _compiled("tiny-llama")
    _, cm64 = _compiled("tiny-llama", torch.float64)
    _, cm16 = _compiled("tiny-llama", torch.bfloat16)
    assert orca_compile.optimize(cm, num_kv_blocks=16).backend == "cpu"
    assert orca_compile.optimize(cm64, num_kv_blocks=16).backend == "cpu"
    assert orca_compile.optimize(cm16, num_kv_blocks=16).backend == "eager"
    assert orca_compile.optimize(cm, num_kv_blocks=16, backend="eager").backend == "eager"
    assert orca_compile.optimize(cm, num_kv_blocks=16, backend="onednn").backend == "onednn"
    with pytest.raises(ValueError, match="backend='onednn' cannot apply: it needs float32 weights on the CPU; this model has torch.float64 on cpu"):
        orca_compile.optimize(cm64, num_kv_blocks=16, backend="onednn")
    # without the C kernels: auto falls back to oneDNN in float32, eager in float64; cpu says why not
    monkeypatch.setattr(gemm_cpu.LIB, "_lib", None)
    monkeypatch.setattr(gemm_cpu.LIB, "_error", "disabled by ORCA_CPU_KERNELS=0")
    assert orca_compile.optimize(cm, num_kv_blocks=16).backend == "onednn"
    assert orca_compile.optimize(cm64, num_kv_blocks=16).backend == "eager"
    with pytest.raises(ValueError, match="backend='cpu' cannot apply: the C GEMM kernel is unavailable: disabled"):
        orca_compile.optimize(cm, num_kv_blocks=16, backend="cpu")


@pytest.mark.parametrize("backend", ["cpu", "onednn"])
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-opt"])
def test_lowered_engine_gives_the_eager_engines_tokens(name, backend):
    # Greedy in float32 on both backends. The logits differ by ~1e-7 (above); random tiny models
    # have top-2 gaps of ~1e-2, so a flipped argmax would mean a real bug, not rounding.
    if not lower_cpu.available({"cpu": "orca", "onednn": "onednn"}[backend]):
        pytest.skip(f"{backend} kernels unavailable")
    _, cm = _compiled(name)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, cm.vocab_size, (n,), generator=g).tolist() for n in (5, 23, 12, 40)]
    params = orca_compile.SamplingParams(max_tokens=12, ignore_eos=True, logprobs=True)
    outs = {b: orca_compile.optimize(cm, num_kv_blocks=32, backend=b, max_num_batched_tokens=32).generate(prompts, params)
            for b in ("eager", backend)}
    for a, b in zip(outs["eager"], outs[backend]):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 2e-5
