"""lower_sixteen_bit: the rewrite ``lower_linears`` makes on the 16-bit-multiply path (the gated
MLP's product in 16 bits), on a graph built by hand, against the same lowering without it, and the
arithmetic fact that makes it exact. Family-wide counts are in tests/acceptance/test_sixteen_bit.py.
"""
import types

import pytest
import torch
import torch.fx
from torch.fx.passes.shape_prop import ShapeProp

from orca_compile import sixteen_bit
from orca_compile.passes import lower_cpu, lower_sixteen_bit

aten = torch.ops.aten
# reason: oneDNN packs no bfloat16 weights without AVX-512 BW/VL/DQ or AVX-NE-CONVERT (torch
# refuses there; the refusal is tested in tests/acceptance/test_sixteen_bit.py on every machine)
NATIVE_BF16 = pytest.mark.skipif(not sixteen_bit.native_supported(torch.bfloat16),
                                 reason="oneDNN takes no bfloat16 weights on this CPU")


def _graph(variant):
    """x -> q, k, v = linear(x, Wq/Wk/Wv, bias) and gate = silu(linear(x, Wg)), up = linear(x, Wu);
    out = (q, k, v, linear(gate * up, Wd)) (and ``up`` too for the variant "up-read-later"). The
    weights hold bfloat16 values exactly. Returns the module with ``meta["val"]`` on its nodes and
    its input."""
    g = torch.Generator().manual_seed(0)
    root = torch.nn.Module()

    def weight(*shape):
        return (torch.randn(*shape, generator=g) * 0.3).to(torch.bfloat16).float()

    root.wq, root.wk, root.wv = weight(24, 16), weight(8, 16), weight(8, 16)
    root.bq, root.bk, root.bv = weight(24), weight(8), weight(8)
    root.wg, root.wu, root.wd = weight(40, 16), weight(40, 16), weight(16, 40)
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    c, a = graph.call_function, graph.get_attr
    q = c(aten.linear.default, (x, a("wq"), a("bq")))
    k = c(aten.linear.default, (x, a("wk"), a("bk")))
    v = c(aten.linear.default, (x, a("wv"), a("bv")))
    gate = c(aten.silu.default, (c(aten.linear.default, (x, a("wg"))),))
    up = c(aten.linear.default, (x, a("wu")))
    out = c(aten.linear.default, (c(aten.mul.Tensor, (gate, up)), a("wd")))
    graph.output((q, k, v, out) + ((up,) if variant == "up-read-later" else ()))
    gm = torch.fx.GraphModule(root, graph)
    gm.meta["orca"] = types.SimpleNamespace(matmul_dtype=torch.bfloat16, weight_storage=torch.bfloat16)
    inp = torch.randn(5, 16, generator=g)
    ShapeProp(gm).propagate(inp)
    for n in gm.graph.nodes:
        if hasattr(n.meta.get("tensor_meta"), "shape"):
            n.meta["val"] = torch.empty(n.meta["tensor_meta"].shape, dtype=n.meta["tensor_meta"].dtype)
    return gm, inp


def _lowered(gm, monkeypatch, products=True):
    with monkeypatch.context() as m:
        if not products:
            m.setattr(lower_sixteen_bit, "multiply_in_sixteen_bits", lambda gm: 0)
        return lower_cpu.lower_linears(gm, kernel="orca")


@NATIVE_BF16
def test_gated_product_runs_in_sixteen_bits(monkeypatch):
    gm, x = _graph("plain")
    lowered = _lowered(gm, monkeypatch)
    assert lowered.meta["orca_lowering"]["sixteen_bit_products"] == 1
    (mul,) = lowered.graph.find_nodes(op="call_function", target=aten.mul.Tensor)
    assert all(a.target is lower_cpu.PACKED_LINEAR for a in mul.args)  # no cast in between
    assert list(mul.users)[0].target is lower_cpu.PACKED_LINEAR
    # bit for bit what the casts around a float32 product gave
    want = _lowered(gm, monkeypatch, products=False)(x)
    assert all(torch.equal(a, b) for a, b in zip(lowered(x), want))


@NATIVE_BF16
def test_a_widened_value_read_elsewhere_keeps_the_float32_product(monkeypatch):
    gm, x = _graph("up-read-later")  # up's float32 value is an output too: its cast stays, so does the product
    lowered = _lowered(gm, monkeypatch)
    assert lowered.meta["orca_lowering"]["sixteen_bit_products"] == 0
    (mul,) = lowered.graph.find_nodes(op="call_function", target=aten.mul.Tensor)
    assert mul.meta["val"].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_sixteen_bit_product_rounds_once(dtype):
    # why the rewrite keeps every bit: ATen's 16-bit mul is the float32 product rounded to the
    # 16-bit dtype, which is what the casts around a float32 mul did, over the whole range (tiny,
    # huge, subnormal, overflowing, signed zeros, inf, NaN)
    g = torch.Generator().manual_seed(1)
    info = torch.finfo(dtype)
    a = torch.cat([torch.randn(20000, generator=g) * s for s in (1e-3, 1.0, 1e3)]
                  + [torch.tensor([info.max, info.tiny, info.smallest_normal / 4, -0.0, float("inf"), float("nan")])])
    b = torch.cat([torch.randn(20000, generator=g) * s for s in (1e2, 1.0, 1e-4)]
                  + [torch.tensor([2.0, 0.5, 3.0, 5.0, -1.0, 1.0])])
    a, b = a.to(dtype), b.to(dtype)
    got, want = a * b, (a.float() * b.float()).to(dtype)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)  # NaNs stay NaNs (their payload bits may differ)
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))  # the rest bit for bit


@NATIVE_BF16
def test_check_catches_a_linear_fed_another_dtype(monkeypatch):
    gm, x = _graph("plain")
    lowered = _lowered(gm, monkeypatch)
    lower_cpu.check_linears(lowered)
    linear = next(iter(lowered.graph.find_nodes(op="call_function", target=lower_cpu.PACKED_LINEAR)))
    cast = linear.args[0]
    assert cast.target is aten._to_copy.default and cast.kwargs["dtype"] == torch.bfloat16
    linear.args = (cast.args[0],) + linear.args[1:]  # the float32 value, skipping its cast
    with pytest.raises(AssertionError, match=r"torch.float32 input, torch.bfloat16 weight"):
        lower_cpu.check_linears(lowered)
