"""The C residual add + layer norm (kernels/cpu_norm.c via norm_cpu.add_layer_norm) against torch.

float64: the kernel and torch differ in summation order only: 1e-12 on outputs of scale ~1-3.
float32: a row's mean and variance are sums of n float32 terms (~n * 6e-8 relative), so the
normalised outputs (scale ~1-3, times weights ~1) move by ~1e-6 at n = 768; 2e-5 is well above
that and far below what a wrong mean, variance, eps, weight or row offset gives (>1e-2).
"""
import sys

import pytest
import torch
import torch.nn.functional as F

from orca_compile.kernels import cbuild, norm_cpu

LINUX_WITH_CC = sys.platform.startswith("linux") and cbuild.compiler() is not None


def test_the_kernel_builds_where_a_compiler_is():
    if LINUX_WITH_CC:
        assert norm_cpu.available(), norm_cpu.why_unavailable()
    else:
        assert not norm_cpu.available() and norm_cpu.why_unavailable()


# reason: no C compiler (not Linux, or none on PATH); the test above fails instead where one is
pytestmark = pytest.mark.skipif(not norm_cpu.available(), reason=f"C norm kernel not built: {norm_cpu.why_unavailable()}")


def _inputs(m, n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x, r = (torch.randn(m, n, generator=g, dtype=torch.float64) * 2 + 0.5 for _ in range(2))
    w, b = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (x, r, w, b)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
# n: one element, below and at a vector, past whole vectors, GPT-2's 768; m: empty, one row, a few,
# and 700 x 100 (past the size from which rows are split over threads)
@pytest.mark.parametrize("m,n", [(0, 8), (1, 1), (3, 7), (5, 8), (33, 100), (4, 768), (700, 100)])
@pytest.mark.parametrize("residual,affine", [(True, True), (False, True), (True, False)])
def test_matches_torch(dtype, m, n, residual, affine):
    x, r, w, b = _inputs(m, n, dtype, seed=m * 1000 + n)
    r = r if residual else None
    w, b = (w, b) if affine else (None, None)
    s, y = norm_cpu.add_layer_norm(x, r, w, b, 1e-5)
    want_s = x.double() + (r.double() if residual else 0)
    want_y = F.layer_norm(want_s, [n], None if w is None else w.double(), None if b is None else b.double(), 1e-5)
    assert s.shape == y.shape == x.shape and s.dtype == y.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(s.double(), want_s, atol=tol, rtol=0)
    torch.testing.assert_close(y.double(), want_y, atol=tol, rtol=0)


def test_eps_and_constant_rows():
    # a constant row has variance 0: the output is the bias alone (eps keeps 1/sqrt finite)
    x = torch.full((2, 16), 3.0, dtype=torch.float64)
    w, b = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    _, y = norm_cpu.add_layer_norm(x, None, w, b, 1e-5)
    torch.testing.assert_close(y, b.expand(2, 16), atol=0, rtol=0)
    x = torch.randn(3, 16, dtype=torch.float64)
    for eps in (1e-5, 1.0):  # eps enters the variance
        torch.testing.assert_close(norm_cpu.add_layer_norm(x, None, None, None, eps)[1],
                                   F.layer_norm(x, [16], eps=eps), atol=1e-12, rtol=0)


def test_strided_and_batched_inputs():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 2 * 24, generator=g, dtype=torch.float64)
    x = base[:, 24:]  # row stride 48: a column slice of a wider tensor
    r = torch.randn(24, 6, generator=g, dtype=torch.float64).t()  # column stride 6: copied first
    w = torch.randn(2 * 24, generator=g, dtype=torch.float64)[::2]  # a non-contiguous weight
    s, y = norm_cpu.add_layer_norm(x, r, w, None, 1e-5)
    torch.testing.assert_close(s, x + r, atol=1e-12, rtol=0)
    torch.testing.assert_close(y, F.layer_norm(x + r, [24], w, None, 1e-5), atol=1e-12, rtol=0)
    x3 = torch.randn(2, 3, 24, generator=g, dtype=torch.float64)
    s3, y3 = norm_cpu.add_layer_norm(x3, x3, None, None, 1e-5)
    assert s3.shape == y3.shape == (2, 3, 24)
    torch.testing.assert_close(y3, F.layer_norm(2 * x3, [24], eps=1e-5), atol=1e-12, rtol=0)


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_count_does_not_change_the_result(threads):
    x, r, w, b = _inputs(700, 100, torch.float32, seed=7)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = norm_cpu.add_layer_norm(x, r, w, b, 1e-5)
        torch.set_num_threads(threads)
        got = norm_cpu.add_layer_norm(x, r, w, b, 1e-5)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, c) for a, c in zip(got, want))  # rows are independent: bit for bit


def test_bad_inputs_raise():
    x, r, w, b = _inputs(2, 8, torch.float32, seed=0)
    with pytest.raises(ValueError, match="one dtype, got x torch.float32 on cpu, r torch.float64 on cpu"):
        norm_cpu.add_layer_norm(x, r.double(), w, b, 1e-5)
    with pytest.raises(ValueError, match="float32 or float64"):
        norm_cpu.add_layer_norm(x.half(), None, None, None, 1e-5)
    with pytest.raises(ValueError, match=r"shapes do not fit: x \(2, 8\), r \(1, 8\)"):
        norm_cpu.add_layer_norm(x, r[:1], w, b, 1e-5)
    with pytest.raises(ValueError, match=r"weight and bias must be \[8\]"):
        norm_cpu.add_layer_norm(x, r, w[:4], b, 1e-5)
    with pytest.raises(ValueError, match="on meta"):
        norm_cpu.add_layer_norm(x, r, w, b.to("meta"), 1e-5)
    with pytest.raises(ValueError, match="last dim"):
        norm_cpu.add_layer_norm(torch.zeros(3, 0), None, None, None, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reuse_writes_the_results_over_the_inputs(dtype):
    g = torch.Generator().manual_seed(3)
    x, r = (torch.randn(7, 40, generator=g, dtype=dtype) for _ in range(2))
    w, b = (torch.randn(40, generator=g, dtype=dtype) for _ in range(2))
    want_s, want_y = norm_cpu.add_layer_norm(x, r, w, b, 1e-5)  # into new tensors
    x2, r2 = x.clone(), r.clone()
    s, y = norm_cpu.add_layer_norm(x2, r2, w, b, 1e-5, reuse=True)
    assert s.data_ptr() == x2.data_ptr() and y.data_ptr() == r2.data_ptr()
    # the same arithmetic either way: bit for bit
    torch.testing.assert_close(s, want_s, rtol=0, atol=0)
    torch.testing.assert_close(y, want_y, rtol=0, atol=0)


def test_reuse_falls_back_to_new_tensors_where_the_layouts_do_not_allow_it():
    g = torch.Generator().manual_seed(4)
    w, b = torch.randn(32, generator=g), torch.randn(32, generator=g)
    base, wide = torch.randn(9, 32, generator=g), torch.randn(8, 80, generator=g)
    cases = {  # name: (x, r, written over)
        "rows of other strides": (torch.randn(8, 64, generator=g)[:, :32], torch.randn(8, 32, generator=g), True),
        "overlapping rows": (base[:8], base[1:], False),
        "interleaved rows": (wide[:, :32], wide[:, 16:48], False),
        "no residual": (torch.randn(8, 32, generator=g), None, False),
        "3-d": (torch.randn(2, 4, 32, generator=g), torch.randn(2, 4, 32, generator=g), False),
    }
    for name, (x, r, over) in cases.items():
        x0, r0 = x.clone(), None if r is None else r.clone()
        s, y = norm_cpu.add_layer_norm(x, r, w, b, 1e-5, reuse=True)
        want = x0 if r is None else x0 + r0
        torch.testing.assert_close(s, want, msg=name)
        torch.testing.assert_close(y, F.layer_norm(want, (32,), w, b, 1e-5), msg=name)
        if over:
            assert s.data_ptr() == x.data_ptr() and y.data_ptr() == r.data_ptr(), name
        else:  # nothing written over
            assert torch.equal(x, x0) and (r is None or torch.equal(r, r0)), name


# ------------------------------------------------------------------- RMS norm (norm_cpu.add_rms_norm)

def _rms(s, w, eps):
    """HF's RMSNorm in float64: w * (s * rsqrt(mean(s^2) + eps))."""
    y = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)
    return y if w is None else w * y


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
# n: one element, below a vector, a vector and a tail, Qwen2.5-0.5B's 896; 700 x 100 is past the
# size from which rows are split over threads
@pytest.mark.parametrize("m,n", [(0, 8), (1, 1), (3, 7), (5, 8), (33, 100), (8, 896), (700, 100)])
@pytest.mark.parametrize("residual,affine", [(True, True), (False, True), (True, False)])
def test_rms_norm_matches_torch(dtype, m, n, residual, affine):
    x, r, w, _ = _inputs(m, n, dtype, seed=m * 1000 + n + 1)
    r = r if residual else None
    w = w if affine else None
    s, y = norm_cpu.add_rms_norm(x, r, w, 1e-6)
    want_s = x.double() + (r.double() if residual else 0)
    assert s.shape == y.shape == x.shape and s.dtype == y.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(s.double(), want_s, atol=tol, rtol=0)
    torch.testing.assert_close(y.double(), _rms(want_s, None if w is None else w.double(), 1e-6), atol=tol, rtol=0)


@pytest.mark.parametrize("narrow", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [7, 8, 33, 896])
def test_rms_norm_reads_and_writes_sixteen_bits_as_the_casts_did(narrow, n):
    # r a 16-bit linear's result: widened exactly, so s is bit for bit x + r.float(); out_dtype:
    # y rounded to nearest even, as y.to(narrow) rounds the kernel's own float32 y
    x, r, w, _ = _inputs(6, n, torch.float32, seed=n)
    r16 = r.to(narrow)
    s, y = norm_cpu.add_rms_norm(x, r16, w, 1e-6, out_dtype=narrow)
    s32, y32 = norm_cpu.add_rms_norm(x, r16.float(), w, 1e-6)
    assert s.dtype == torch.float32 and y.dtype == narrow
    assert torch.equal(s, x + r16.float()) and torch.equal(s, s32)
    assert torch.equal(y, y32.to(narrow))  # the tail elements too (n = 7, 33)
    # and the float32 result is HF's norm to float32 rounding
    torch.testing.assert_close(y32.double(), _rms(s.double(), w.double(), 1e-6), atol=2e-5, rtol=0)


def test_rms_norm_rounds_to_nearest_even_and_keeps_nan():
    # values exactly halfway between two bfloat16s go to the even one; a NaN row stays NaN
    x = torch.tensor([[1.0] * 16])
    w = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8] + [1.0] * 14)  # y = w (the row's RMS is 1)
    _, y = norm_cpu.add_rms_norm(x, None, w, 0.0, out_dtype=torch.bfloat16)
    assert y[0, :2].tolist() == [1.0, 1 + 2 ** -6] == w[:2].to(torch.bfloat16).tolist()
    # a NaN whose low bits would carry into the sign and exponent if rounded like a number
    # (0xFFFFFFFF + 0x7FFF wraps to +0.0): stored as bfloat16's NaN, as c10::BFloat16 stores it
    nan = torch.tensor([-1], dtype=torch.int32).view(torch.float32)
    x = torch.cat([nan, torch.ones(8)])[None]
    s, y = norm_cpu.add_rms_norm(x, None, None, 1e-6, out_dtype=torch.bfloat16)
    assert torch.isnan(y.float()).all() and y.view(torch.int16)[0, 0].item() == 0x7FC0
    assert s.data_ptr() == x.data_ptr()  # without a residual, s is x itself: not copied


def test_rms_norm_in_place_and_bad_inputs():
    x, r, w, _ = _inputs(5, 40, torch.float32, seed=9)
    want_s, want_y = norm_cpu.add_rms_norm(x, r, w, 1e-6)
    x2, r2 = x.clone(), r.clone()
    s, y = norm_cpu.add_rms_norm(x2, r2, w, 1e-6, reuse=True)
    assert s.data_ptr() == x2.data_ptr() and y.data_ptr() == r2.data_ptr()
    assert torch.equal(s, want_s) and torch.equal(y, want_y)
    # a 16-bit r of another dtype than y: y cannot go over it; s still goes over x
    r16 = r.to(torch.bfloat16)
    want_s, want_y = norm_cpu.add_rms_norm(x, r16, w, 1e-6)
    x2, r2 = x.clone(), r16.clone()
    s, y = norm_cpu.add_rms_norm(x2, r2, w, 1e-6, reuse=True)
    assert s.data_ptr() == x2.data_ptr() and y.data_ptr() != r2.data_ptr() and y.dtype == torch.float32
    assert torch.equal(s, want_s) and torch.equal(y, want_y)
    x2, r2 = x.clone(), r16.clone()  # the same dtype: y goes over r, after the row's r was read
    s, y = norm_cpu.add_rms_norm(x2, r2, w, 1e-6, reuse=True, out_dtype=torch.bfloat16)
    assert y.data_ptr() == r2.data_ptr()
    assert torch.equal(s, want_s) and torch.equal(y, want_y.to(torch.bfloat16))
    with pytest.raises(ValueError, match="under a float32 x only, got x float64, r torch.bfloat16"):
        norm_cpu.add_rms_norm(x.double(), r.to(torch.bfloat16), w.double(), 1e-6)
    with pytest.raises(ValueError, match="got r torch.float32, out_dtype torch.int32"):
        norm_cpu.add_rms_norm(x, r, w, 1e-6, out_dtype=torch.int32)
    with pytest.raises(ValueError, match=r"shapes do not fit: x \(5, 40\), r \(1, 40\)"):
        norm_cpu.add_rms_norm(x, r[:1].to(torch.bfloat16), w, 1e-6)
