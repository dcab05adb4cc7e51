"""fuse_rope (run by lower_cpu with ``kernel="orca"``): HF's rotary embedding becomes one C call
where its chain is its own, and nothing changes where it is not. Family-wide counts are in
test_lower_cpu.py; these are graphs built by hand.

Tolerance: the kernel's products may fuse into an FMA, ~1e-7 relative in float32; 1e-5.
"""
import pytest
import torch
import torch.fx

from orca_compile.kernels import gemm_cpu, rope_cpu
from orca_compile.passes import fuse_rope, lower_cpu

aten = torch.ops.aten
# reason: a kernel not built means no C compiler (not Linux, or none on PATH); where one is, the
# kernels' own test_the_kernel_builds_where_a_compiler_is fails instead of this skipping
pytestmark = [
    pytest.mark.skipif(not gemm_cpu.available(), reason=f"C GEMM: {gemm_cpu.why_unavailable()}"),
    pytest.mark.skipif(not rope_cpu.available(), reason=f"C RoPE kernel: {rope_cpu.why_unavailable()}"),
]
H, T, D = 3, 5, 8


def _rope_graph(variant):
    """q = transpose(view(linear(x, W), [T, H, D]), 0, 1); y = HF's rotation of q; out = y."""
    root = torch.nn.Module()
    root.w = torch.randn(H * D, 4, generator=torch.Generator().manual_seed(0))
    graph = torch.fx.Graph()
    x, cos, sin = graph.placeholder("x"), graph.placeholder("cos"), graph.placeholder("sin")
    c = graph.call_function
    q = c(aten.transpose.int, (c(aten.view.default, (c(aten.linear.default, (x, graph.get_attr("w"))), [T, H, D])), 0, 1))
    if variant == "per-head table":  # cos, sin [H, T, D]: not HF's table, which is one per position
        cu, su = (c(aten.expand.default, (c(aten.unsqueeze.default, (t, 0)), [H, T, D])) for t in (cos, sin))
        cu, su = (c(aten.mul.Tensor, (t, 1.5)) for t in (cu, su))
    else:
        cu, su = c(aten.unsqueeze.default, (cos, 0)), c(aten.unsqueeze.default, (sin, 0))
    other = c(aten.mul.Tensor, (q, 2.0))  # a tensor of q's shape that is not q
    x1 = c(aten.slice.Tensor, (q, 2, 0, D // 2))
    x2 = c(aten.slice.Tensor, (q, 2, D // 2, None if variant == "end None" else 9223372036854775807))
    first, second = (x1, x2) if variant == "halves swapped" else (x2, x1)  # rotate_half: cat(-x2, x1)
    r = c(aten.cat.default, ([c(aten.neg.default, (first,)), second], -1))
    a = c(aten.mul.Tensor, (cu, q) if variant == "operands swapped" else (other if variant == "another x" else q, cu))
    b = c(aten.mul.Tensor, (su, r) if variant == "operands swapped" else (r, su))
    y = c(aten.add.Tensor, (b, a) if variant == "operands swapped" else (a, b))
    graph.output((y, r) if variant == "rotate_half read later" else (y,))
    gm = torch.fx.GraphModule(root, graph)
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(gm).propagate(torch.randn(T, 4), torch.randn(T, D), torch.randn(T, D))
    for n in gm.graph.nodes:
        if hasattr(n.meta.get("tensor_meta"), "shape"):
            n.meta["val"] = torch.empty(n.meta["tensor_meta"].shape, dtype=n.meta["tensor_meta"].dtype)
    return gm


@pytest.mark.parametrize("variant,fused", [("plain", True), ("operands swapped", True), ("end None", True),
                                           ("rotate_half read later", False), ("halves swapped", False),
                                           ("per-head table", False), ("another x", False)])
def test_the_rotation_is_fused_only_where_its_chain_is_hfs_and_its_own(variant, fused):
    gm = _rope_graph(variant)
    args = (torch.randn(T, 4), torch.randn(T, D), torch.randn(T, D))
    want = gm(*args)
    lowered = lower_cpu.lower_cpu(gm, kernel="orca")
    calls = list(lowered.graph.find_nodes(op="call_function", target=rope_cpu.rotate))
    assert len(calls) == lowered.meta["orca_lowering"]["fused_rope"] == int(fused)
    ops = {n.target for n in lowered.graph.nodes if n.op == "call_function"}
    assert (aten.neg.default in ops) != fused and (aten.cat.default in ops) != fused
    got = lowered(*args)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    if fused:  # laid out as q, the projection's [T, H, D] rows: what ATen's add leaves in HF's order
        assert got[0].stride() == (D, H * D, 1)
        if variant in ("plain", "end None"):
            assert got[0].stride() == want[0].stride()


def test_off_when_asked():
    lowered = lower_cpu.lower_cpu(_rope_graph("plain"), kernel="orca", fuse_rope=False)
    assert lowered.meta["orca_lowering"]["fused_rope"] == 0
    assert not list(lowered.graph.find_nodes(op="call_function", target=rope_cpu.rotate))


def test_the_postcondition_refuses_a_rotation_whose_table_does_not_fit():
    lowered = lower_cpu.lower_cpu(_rope_graph("plain"), kernel="orca")
    fuse_rope.check(lowered)  # as the pass leaves it: fine
    (call,) = lowered.graph.find_nodes(op="call_function", target=rope_cpu.rotate)
    call.args = (call.args[0], call.args[0], call.args[2])  # q itself as the cos table: [H, T, D]
    with pytest.raises(AssertionError, match="do not fit"):
        fuse_rope.check(lowered)
