"""The C argmax (kernels/cpu_argmax.c via argmax_cpu.argmax) against torch.argmax: the same index,
ties and NaNs included."""
import sys

import pytest
import torch

from orca_compile.kernels import argmax_cpu, cbuild

LINUX_WITH_CC = sys.platform.startswith("linux") and cbuild.compiler() is not None


def test_the_kernel_builds_where_a_compiler_is():
    if LINUX_WITH_CC:
        assert argmax_cpu.available(), argmax_cpu.why_unavailable()
    else:
        assert not argmax_cpu.available() and argmax_cpu.why_unavailable()


pytestmark_kernel = pytest.mark.skipif(not argmax_cpu.available(),
                                       reason=f"C argmax not built: {argmax_cpu.why_unavailable()}")


@pytestmark_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 3, 4, 8, 9, 17, 1000, 50257])
def test_argmax_matches_torch(dtype, n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(7, n, generator=g, dtype=torch.float64).to(dtype)
    x[1] = 0.0                                   # all equal: the first
    x[2, n // 2:] = float("-inf")
    x[3, min(7, n - 1)] = x[3, min(8, n - 1)] = x[3, n - 1] = 1e30  # tied maxima (lanes 7, 0): the first
    x[4, n // 2] = float("nan")                  # NaN wins, as in torch
    x[5, n - 1] = float("nan")
    x[5, 0] = float("nan")
    x[6] = float("-inf")
    got = argmax_cpu.argmax(x)
    assert got.dtype == torch.int64 and torch.equal(got, x.argmax(dim=-1))


@pytestmark_kernel
def test_argmax_strided_rows_and_what_it_leaves_to_torch():
    x = torch.randn(5, 300)
    view = x[:, 7:207]  # row stride 300 > 200 columns
    assert torch.equal(argmax_cpu.argmax(view), view.argmax(dim=-1))
    assert argmax_cpu.argmax(x.t()) is None          # columns not contiguous
    assert argmax_cpu.argmax(x.bfloat16()) is None
    assert argmax_cpu.argmax(x[0]) is None           # 1-D
    assert argmax_cpu.argmax(torch.empty(3, 0)) is None
    assert torch.equal(argmax_cpu.argmax(torch.empty(0, 5)), torch.empty(0, dtype=torch.int64))
