"""The C rotary embedding (kernels/cpu_rope.c via rope_cpu.rotate) against HF's formula in torch.

float64: two products and a sum per element, which the compiler may fuse into one FMA: a rounding
step of ~1e-16 relative apart at most; 1e-13 on values of scale ~1-10. float32: the same at
~6e-8 relative; 2e-6. A wrong half, sign, table row or stride is off by O(1).
"""
import sys

import pytest
import torch

from orca_compile.kernels import cbuild, rope_cpu

LINUX_WITH_CC = sys.platform.startswith("linux") and cbuild.compiler() is not None


def test_the_kernel_builds_where_a_compiler_is():
    if LINUX_WITH_CC:
        assert rope_cpu.available(), rope_cpu.why_unavailable()
    else:
        assert not rope_cpu.available() and rope_cpu.why_unavailable()


# reason: no C compiler (not Linux, or none on PATH); the test above fails instead where one is
pytestmark = pytest.mark.skipif(not rope_cpu.available(), reason=f"C RoPE kernel not built: {rope_cpu.why_unavailable()}")


def _reference(x, cos, sin):
    h = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., h:], x[..., :h]], -1) * sin


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("heads,tokens,dim", [(1, 1, 2), (4, 7, 16), (12, 33, 64), (2, 0, 8), (3, 5, 6)])
@pytest.mark.parametrize("layout", ["projection view", "contiguous", "3-d tables"])
def test_matches_torch(dtype, heads, tokens, dim, layout):
    g = torch.Generator().manual_seed(heads * 100 + tokens)
    proj = torch.randn(tokens, heads * dim, generator=g, dtype=torch.float64).to(dtype) * 3
    x = proj.view(tokens, heads, dim).transpose(0, 1)  # [H, T, D] with strides (D, H * D, 1), as the graph has it
    if layout == "contiguous":
        x = x.contiguous()
    cos, sin = (torch.randn(tokens, dim, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    if layout == "3-d tables":
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    y = rope_cpu.rotate(x, cos, sin)
    assert y.shape == x.shape and y.dtype == dtype
    assert y.stride() == torch.empty_like(x).stride()  # x's layout, as ATen's ops leave it
    tol = 1e-13 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(y, _reference(x, cos, sin), atol=tol * 10, rtol=tol)


def test_the_halves_are_not_interchangeable():
    # a table whose halves differ (HF's are equal for its default rope): each half reads its own
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    cos, sin = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(rope_cpu.rotate(x, cos, sin), _reference(x, cos, sin), atol=1e-13, rtol=0)
    assert not torch.allclose(rope_cpu.rotate(x, cos, sin), _reference(x, cos.roll(4, -1), sin.roll(4, -1)))


def test_bad_inputs_raise():
    x, t = torch.randn(2, 3, 8), torch.randn(3, 8)
    for args in [(x, t.double(), t), (x[..., :7], t[:, :7], t[:, :7]), (x, t[:2], t[:2]), (x[0], t, t),
                 (x.half(), t.half(), t.half()), (x, torch.randn(2, 3, 8), t)]:
        with pytest.raises(ValueError, match="rotate takes x"):
            rope_cpu.rotate(*args)
