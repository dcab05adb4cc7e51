"""fuse_norms (a pass of the ``cpu`` lowering): which layer norms become one C call with their
residual add, and when the call may write over its operands. Family-wide counts are in
test_lower_cpu.py (``test_every_linear_is_packed_and_the_activation_fused``); these are graphs
built by hand, each with one thing about it that must or must not block the rewrite.

Tolerance: the C kernel sums a row in another order than ATen, ~1e-7 relative in float32; 1e-5
on outputs of scale ~1-10 is well above that and far below a wrong operand, weight or eps.
"""
import types

import pytest
import torch
import torch.fx

from orca_compile import sixteen_bit
from orca_compile.kernels import gemm_cpu, norm_cpu
from orca_compile.passes import fuse_norms, lower_cpu
from tests.passes.test_lower_cpu import _compiled

aten = torch.ops.aten
# reason: a kernel not built means no C compiler (not Linux, or none on PATH); where one is, the
# kernels' own test_the_kernel_builds_where_a_compiler_is fails instead of this skipping
pytestmark = [
    pytest.mark.skipif(not gemm_cpu.available(), reason=f"C GEMM: {gemm_cpu.why_unavailable()}"),
    pytest.mark.skipif(not norm_cpu.available(), reason=f"C norm kernel: {norm_cpu.why_unavailable()}"),
]


# ------------------------------------------------------------------------------ norms written in place

def _norm_graph(variant):
    """a = linear(x, W1), b = linear(x, W2) (or another operand), s = a + b, y = layer_norm(s),
    out = linear(y, W3): the residual point of a pre-norm block. Returns (module, outputs' names)."""
    root = torch.nn.Module()
    g = torch.Generator().manual_seed(0)
    root.w1, root.w2, root.w3 = (torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g),
                                 torch.randn(4, 16, generator=g))
    root.lw, root.lb = torch.randn(16, generator=g), torch.randn(16, generator=g)
    graph = torch.fx.Graph()
    x, extra = graph.placeholder("x"), graph.placeholder("extra")
    lw, lb = graph.get_attr("lw"), graph.get_attr("lb")  # before the add, as the compiler leaves them
    c = graph.call_function
    a = c(aten.linear.default, (x, graph.get_attr("w1")))
    b = c(aten.linear.default, (x, graph.get_attr("w2")))
    if variant == "view":  # b's value is a view of another tensor: not the add's to overwrite
        b = c(aten.view.default, (c(aten.linear.default, (x, graph.get_attr("w2"))), [5, 16]))
    elif variant == "input":  # a graph input: the caller's tensor
        b = extra
    s = c(aten.add.Tensor, (a, b))
    y = c(aten.layer_norm.default, (s, [16], lw, lb, 1e-5))
    out = c(aten.linear.default, (y, graph.get_attr("w3")))
    graph.output((out, s, a) if variant == "read-later" else (out, s))
    gm = torch.fx.GraphModule(root, graph)
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(gm).propagate(torch.randn(5, 8), torch.randn(5, 16))
    for n in gm.graph.nodes:
        if hasattr(n.meta.get("tensor_meta"), "shape"):  # the output's is a tuple
            n.meta["val"] = torch.empty(n.meta["tensor_meta"].shape, dtype=n.meta["tensor_meta"].dtype)
    return gm


@pytest.mark.parametrize("variant,in_place", [("plain", True), ("read-later", False), ("view", False),
                                              ("input", False)])
def test_a_norm_writes_over_its_operands_only_where_nothing_else_reads_them(variant, in_place):
    gm = _norm_graph(variant)
    x, extra = torch.randn(5, 8), torch.randn(5, 16)
    want = gm(x, extra)
    kept = extra.clone()
    lowered = lower_cpu.lower_cpu(gm, kernel="orca")
    (fused,) = lowered.graph.find_nodes(op="call_function", target=norm_cpu.add_layer_norm)
    assert lowered.meta["orca_lowering"]["norms_in_place"] == int(in_place) and fused.args[5] is in_place
    got = lowered(x, extra)
    for g_, w_ in zip(got, want):  # "read-later" also returns a: overwriting it would show here
        torch.testing.assert_close(g_, w_, atol=1e-5, rtol=1e-5)
    assert torch.equal(extra, kept)  # a graph input is never written


def test_every_gpt2_norm_is_in_place():
    # each residual add's operands are a linear's output and the previous norm's residual (the
    # first: two embedding lookups), read nowhere else
    _, cm = _compiled("tiny-gpt2")
    lowered = lower_cpu.lower_cpu(cm.graph_module, kernel="orca")
    fused = list(lowered.graph.find_nodes(op="call_function", target=norm_cpu.add_layer_norm))
    assert len(fused) == lowered.meta["orca_lowering"]["norms_in_place"] == 2 * cm.num_layers + 1
    assert all(n.args[5] is True for n in fused)


def test_the_postcondition_refuses_an_in_place_norm_whose_operand_is_read_elsewhere():
    lowered = lower_cpu.lower_cpu(_norm_graph("plain"), kernel="orca")
    fuse_norms.check(lowered)  # as the pass leaves it: fine
    (fused,) = lowered.graph.find_nodes(op="call_function", target=norm_cpu.add_layer_norm)
    out = lowered.graph.output_node()
    out.args = (tuple(out.args[0]) + (fused.args[0],),)  # a second reader of an operand it overwrites
    with pytest.raises(AssertionError, match="read elsewhere"):
        fuse_norms.check(lowered)


# ------------------------------------------------------------------------ RMSNorm on the 16-bit path

def _rms_graph(variant):
    """x (float32), r16 (bfloat16, a 16-bit linear's result): s = x + widen(r16); HF's RMSNorm of s
    as export spells it; y16 = narrow(norm), the input of the next 16-bit linears. Returns the
    module (its graph on the 16-bit-multiply path unless ``variant == "float32-path"``) and inputs."""
    root = torch.nn.Module()
    g = torch.Generator().manual_seed(0)
    root.w = torch.randn(40, generator=g)
    graph = torch.fx.Graph()
    x, r16 = graph.placeholder("x"), graph.placeholder("r16")
    w = graph.get_attr("w")
    c = graph.call_function
    if variant in ("own-memory", "same-operand"):  # operands of their own memory, dying at the add
        x = c(aten.mul.Tensor, (x, 1.5))
        r16 = c(aten.mul.Tensor, (r16, 2.0))
    r = c(aten._to_copy.default, (r16,), {"dtype": torch.float32})
    # the widened operand first (the kernel reads r in 16 bits, never x: the operands swap), or twice
    s = c(aten.add.Tensor, {"own-memory": (r, x), "same-operand": (r, r)}.get(variant, (x, r)))
    rstd = c(aten.rsqrt.default, (c(aten.add.Tensor, (c(aten.mean.dim, (c(aten.pow.Tensor_Scalar, (s, 2)), [-1], True)),
                                                       1e-6)),))
    y = c(aten.mul.Tensor, (w, c(aten.mul.Tensor, (s, rstd))))
    y16 = c(aten._to_copy.default, (y,), {"dtype": torch.bfloat16})
    graph.output((s, y16) + ((r,) if variant == "r-read-later" else ()))
    gm = torch.fx.GraphModule(root, graph)
    if variant != "float32-path":
        gm.meta["orca"] = types.SimpleNamespace(matmul_dtype=torch.bfloat16)
    inputs = (torch.randn(6, 40, generator=g) * 2, (torch.randn(6, 40, generator=g) * 3).to(torch.bfloat16))
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(gm).propagate(*inputs)
    for n in gm.graph.nodes:
        if hasattr(n.meta.get("tensor_meta"), "shape"):
            n.meta["val"] = torch.empty(n.meta["tensor_meta"].shape, dtype=n.meta["tensor_meta"].dtype)
    return gm, inputs


@pytest.mark.parametrize("variant", ["plain", "r-read-later", "float32-path", "own-memory", "same-operand"])
def test_rms_norm_takes_the_sixteen_bit_casts_with_it(variant):
    gm, inputs = _rms_graph(variant)
    want = gm(*inputs)
    fuse_norms.fuse_norms(gm)
    calls = list(gm.graph.find_nodes(op="call_function", target=norm_cpu.add_rms_norm))
    casts = list(gm.graph.find_nodes(op="call_function", target=aten._to_copy.default))
    if variant == "float32-path":  # no 16-bit multiplies: HF's six ATen ops stay (see fuse_norms)
        assert not calls and gm.meta["orca_lowering"]["fused_rms_norms"] == 0 and len(casts) == 2
        return
    (call,) = calls
    assert gm.meta["orca_lowering"]["fused_rms_norms"] == 1
    assert call.args[-1] == torch.bfloat16 and not any(c.kwargs["dtype"] == torch.bfloat16 for c in casts)
    if variant in ("plain", "own-memory"):  # the widening went too: the kernel reads r16 itself
        assert call.args[1].meta["val"].dtype == torch.bfloat16 and not casts
        assert call.args[0].meta["val"].dtype == torch.float32
    else:  # the widened r is read elsewhere (or is both operands): it stays, and the kernel reads it
        assert call.args[1] is casts[0] and casts[0].kwargs["dtype"] == torch.float32
    # graph inputs are the caller's: never written over; values of their own that die here are
    assert call.args[4] is (variant == "own-memory")
    got = gm(*inputs)
    assert torch.equal(got[0], want[0])  # the residual stream: the same float32 sum
    assert got[1].dtype == torch.bfloat16  # the norm, rounded once: at most an ulp from ATen's (sum order)
    diff = (got[1].float() - want[1].float()).abs()
    assert (diff <= want[1].float().abs() * 2 ** -7).all() and (got[1] == want[1]).float().mean() > 0.9
    assert all(torch.equal(a, b) for a, b in zip(got[2:], want[2:]))


@pytest.mark.parametrize("storage", [None, torch.bfloat16])
def test_rms_norm_on_float32_arithmetic_is_fused_for_sixteen_bit_weights_only(storage):
    # the C GEMM's float32 arithmetic on 16-bit weights (a CPU without AMX): x, r and the norm in
    # float32, fused as on the 16-bit-multiply path; a float32 checkpoint keeps ATen's ops
    root = torch.nn.Module()
    g = torch.Generator().manual_seed(1)
    root.w = torch.randn(40, generator=g)
    graph = torch.fx.Graph()
    x, r, w = graph.placeholder("x"), graph.placeholder("r"), graph.get_attr("w")
    c = graph.call_function
    s = c(aten.add.Tensor, (x, r))
    rstd = c(aten.rsqrt.default, (c(aten.add.Tensor, (c(aten.mean.dim, (c(aten.pow.Tensor_Scalar, (s, 2)), [-1], True)),
                                                       1e-6)),))
    graph.output((s, c(aten.mul.Tensor, (w, c(aten.mul.Tensor, (s, rstd))))))
    gm = torch.fx.GraphModule(root, graph)
    gm.meta["orca"] = types.SimpleNamespace(weight_storage=storage, matmul_dtype=None)
    inputs = (torch.randn(6, 40, generator=g) * 2, torch.randn(6, 40, generator=g))
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(gm).propagate(*inputs)
    for n in gm.graph.nodes:
        if hasattr(n.meta.get("tensor_meta"), "shape"):
            n.meta["val"] = torch.empty(n.meta["tensor_meta"].shape, dtype=n.meta["tensor_meta"].dtype)
    want = gm(*inputs)
    fuse_norms.fuse_norms(gm)
    calls = list(gm.graph.find_nodes(op="call_function", target=norm_cpu.add_rms_norm))
    assert len(calls) == (storage is not None) == gm.meta["orca_lowering"]["fused_rms_norms"]
    got = gm(*inputs)
    assert torch.equal(got[0], want[0]) and got[1].dtype == torch.float32
    # float32 throughout: the sum of squares in another order than ATen's, a few ulps at most
    torch.testing.assert_close(got[1], want[1], rtol=4e-7 * 8, atol=0)


# reason: oneDNN packs no bfloat16 weights without AVX-512 BW/VL/DQ or AVX-NE-CONVERT (its refusal is
# tested in tests/acceptance/test_sixteen_bit.py on every machine)
@pytest.mark.skipif(not sixteen_bit.native_supported(torch.bfloat16), reason="oneDNN takes no bfloat16 weights here")
def test_check_catches_a_linear_fed_another_dtype_by_a_norm():
    # a fused norm that stored float32 where the 16-bit linear after it read its cast's bfloat16
    from orca_compile.passes import lower_cpu

    gm, inputs = _rms_graph("plain")
    graph = gm.graph
    (y16,) = [n for n in graph.nodes if n.target is aten._to_copy.default and n.kwargs["dtype"] == torch.bfloat16]
    gm.packed = torch.ops.mkldnn._reorder_linear_weight(torch.randn(4, 40).to(torch.bfloat16))
    with graph.inserting_after(y16):
        packed = graph.get_attr("packed")
    with graph.inserting_after(packed):
        linear = graph.call_function(lower_cpu.PACKED_LINEAR, (y16, packed, None, "none", [], ""))
    out = graph.output_node()
    out.args = (out.args[0] + (linear,),)
    gm.recompile()
    fuse_norms.fuse_norms(gm)  # the norm now stores the bfloat16 the linear reads: fine
    (call,) = gm.graph.find_nodes(op="call_function", target=norm_cpu.add_rms_norm)
    call.args = call.args[:5] + (None,)  # as if it stored float32
    with pytest.raises(AssertionError, match="oneDNN linears fed another dtype"):
        fuse_norms.check(gm)
