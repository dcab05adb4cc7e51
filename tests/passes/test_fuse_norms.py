"""fuse_norms (a pass of the ``cpu`` lowering): which layer norms become one C call with their
residual add, and when the call may write over its operands. Family-wide counts are in
test_lower_cpu.py (``test_every_linear_is_packed_and_the_activation_fused``); these are graphs
built by hand, each with one thing about it that must or must not block the rewrite.

Tolerance: the C kernel sums a row in another order than ATen, ~1e-7 relative in float32; 1e-5
on outputs of scale ~1-10 is well above that and far below a wrong operand, weight or eps.
"""
import pytest
import torch
import torch.fx

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
