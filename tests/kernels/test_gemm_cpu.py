"""The C GEMM (kernels/cpu_gemm.c via gemm_cpu.linear) against a float64 torch reference.

float64: the kernel and the reference differ in summation order only: 1e-12 relative to the
outputs' scale. float32: each output sums K products with float32 rounding (~K * 6e-8 relative to
sum |a||w|); with K <= 768 and entries ~N(0, 1) that is < 1e-4 absolute on outputs of scale ~30,
so 2e-4 fails any indexing, packing or epilogue bug (those move outputs by O(1)). The vectorised
exp of the float32 activations is checked separately at 2 ulp-ish (4e-7 relative).
"""
import sys

import pytest
import torch
import torch.nn.functional as F

from orca_compile.kernels import cbuild, gemm_cpu

LINUX_WITH_CC = sys.platform.startswith("linux") and cbuild.compiler() is not None
REFERENCE = {"none": lambda x: x, "relu": torch.relu, "silu": F.silu,
             "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "sigmoid": torch.sigmoid}


def test_the_kernel_builds_where_a_compiler_is():
    if LINUX_WITH_CC:
        assert gemm_cpu.available(), gemm_cpu.why_unavailable()
        # the float16 tests skip only where the compiler has no _Float16: not on a compiler that has it
        import subprocess

        macros = subprocess.run([cbuild.compiler(), "-march=native", "-dM", "-E", "-x", "c", "/dev/null"],
                                capture_output=True, text=True, timeout=60).stdout
        assert gemm_cpu.supports(torch.float16) == ("__FLT16_MAX__" in macros)
    else:
        assert not gemm_cpu.available() and gemm_cpu.why_unavailable()


pytestmark_kernel = pytest.mark.skipif(not gemm_cpu.available(),
                                       reason=f"C GEMM not built: {gemm_cpu.why_unavailable()}")
# float16 weights need the C compiler's _Float16 (GCC 12+, Clang): the CI's has it
SIXTEEN_BIT = [torch.bfloat16, pytest.param(torch.float16, marks=pytest.mark.skipif(
    not gemm_cpu.supports(torch.float16), reason="this C compiler has no _Float16"))]


def _want(x, w, b, act):
    y = x.double() @ w.double().t()
    if b is not None:
        y = y + b.double()
    return REFERENCE[act](y)


@pytestmark_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,k", [(16, 8), (37, 19), (8, 1), (5, 3), (64, 768), (1000, 64), (4000, 96)])
@pytest.mark.parametrize("m", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 96, 97, 200])
def test_matches_the_reference(dtype, n, k, m):
    # m: empty, one row, row blocks of 6 and their remainders 1-5 below the kernel's PACED_BELOW
    # (one accumulator set) and above it (1-3-row blocks keep several sets; k odd and k < 4 cover
    # the k loop's tail), the 96-row chunk and past it;
    # n: whole panels, a partial last panel, fewer outputs than a panel; (4000, 96): several L2 groups
    # of panels per thread
    g = torch.Generator().manual_seed(n * 1000 + k + m)
    w = torch.randn(n, k, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    x = torch.randn(m, k, generator=g, dtype=torch.float64).to(dtype)
    got = gemm_cpu.linear(x, gemm_cpu.pack(w), b, n)
    want = _want(x, w, b, "none")
    assert got.shape == (m, n) and got.dtype == dtype
    tol = 1e-12 * (1 + want.abs().max().item() if m else 1) if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=0)


@pytestmark_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("act", list(gemm_cpu.ACTIVATIONS))
def test_fused_activations(dtype, act):
    g = torch.Generator().manual_seed(1)
    n, k, m = 45, 33, 11
    w = torch.randn(n, k, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    x = torch.randn(m, k, generator=g, dtype=torch.float64).to(dtype)
    got = gemm_cpu.linear(x, gemm_cpu.pack(w), b, n, gemm_cpu.ACTIVATIONS[act])
    torch.testing.assert_close(got.double(), _want(x, w, b, act), atol=1e-12 if dtype == torch.float64 else 2e-4,
                               rtol=0)


def _stable(act, x):
    """float64 reference in the overflow-free form the kernel uses, and the exp argument z.
    (torch's float64 gelu-tanh, 0.5x(1 + tanh(u)), cancels to 0 below x = -9.)"""
    if act == "relu":
        return torch.relu(x), torch.zeros_like(x)
    if act == "gelu_tanh":
        z = -2 * 0.7978845608028654 * (x + 0.044715 * x ** 3)
        return x / (1 + torch.exp(z)), z
    z = -x
    return (x if act == "silu" else 1.0) / (1 + torch.exp(z)), z


@pytestmark_kernel
@pytest.mark.parametrize("act", ["silu", "gelu_tanh", "sigmoid", "relu"])
def test_float32_activation_on_its_whole_range(act):
    # one input, weight 1, no bias: the epilogue alone, from far negative (exp's clamp) to far positive.
    # Tolerance: float32 rounds z to ~6e-8 relative, which moves exp(z) by |z| * 6e-8 relative; the
    # polynomial adds ~2 ulp. Below 1e-30 (near float32's denormals) only smallness is asked.
    x = torch.cat([torch.linspace(-100, 100, 4001), torch.tensor([-1e-3, -1e-6, 0.0, 1e-6, 1e-3])])[:, None]
    got = gemm_cpu.linear(x, gemm_cpu.pack(torch.ones(1, 1)), None, 1, gemm_cpu.ACTIVATIONS[act])[:, 0].double()
    want, z = (t[:, 0] for t in _stable(act, x.double()))
    assert got.isfinite().all()
    normal = want.abs() > 1e-30
    err = (got - want).abs()[normal] / want.abs()[normal]
    assert (err <= 3e-7 + 1.2e-7 * z.abs()[normal]).all(), float(err.max())
    assert (got.abs()[~normal] <= 1e-29).all()


@pytestmark_kernel
def test_strided_rows_no_bias_and_leading_dims():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(24, 16, generator=g, dtype=torch.float64)
    wide = torch.randn(9, 48, generator=g, dtype=torch.float64)
    x = wide[:, 16:32]  # rows 48 apart, as a slice of a fused projection
    assert not x.is_contiguous()
    got = gemm_cpu.linear(x, gemm_cpu.pack(w), None, 24)
    torch.testing.assert_close(got, x @ w.t(), atol=1e-12, rtol=0)
    x3 = torch.randn(2, 5, 16, generator=g, dtype=torch.float64)
    torch.testing.assert_close(gemm_cpu.linear(x3, gemm_cpu.pack(w), None, 24), x3 @ w.t(), atol=1e-12, rtol=0)
    cols = torch.randn(16, 9, generator=g, dtype=torch.float64).t()  # unit stride on the wrong dim
    torch.testing.assert_close(gemm_cpu.linear(cols, gemm_cpu.pack(w), None, 24), cols @ w.t(), atol=1e-12, rtol=0)


@pytestmark_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_count_does_not_change_the_result(threads, monkeypatch):
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(100, 40, generator=g), torch.randn(20, 40, generator=g)
    packed = gemm_cpu.pack(w)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    one = gemm_cpu.linear(x, packed, None, 100)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert torch.equal(gemm_cpu.linear(x, packed, None, 100), one)  # each output: one thread, one order


@pytestmark_kernel
@pytest.mark.parametrize("storage", [torch.float32] + SIXTEEN_BIT)
@pytest.mark.parametrize("m", [3, 200])  # a decode's rows and a prefill's (the many-rows driver)
def test_no_inputs_gives_the_bias(storage, m):
    # a linear with zero input features: every output is its bias (and nothing divides by zero)
    b = torch.randn(20)
    got = gemm_cpu.linear(torch.empty(m, 0), gemm_cpu.pack(torch.empty(20, 0), storage), b, 20)
    assert torch.equal(got, b.expand(m, 20))


@pytestmark_kernel
@pytest.mark.parametrize("storage", SIXTEEN_BIT)
def test_sixteen_bit_weights_give_the_float32_weights_results_bit_for_bit(storage):
    # weights the 16-bit dtype holds exactly, packed in 16 bits or in float32: every path of the
    # kernel (the 512-bit kernel on AVX-512 against the 256-bit one, a decode's 7-8 rows in one
    # block against two, two panels at once against one, the many-rows drivers, the blocks' tails
    # of 1-11 rows) gives the same bits
    g = torch.Generator().manual_seed(11)
    # an odd panel count, the last one partial, K odd (the accumulator sets' k loop tail); and a
    # panel larger than the decode driver's group on every CPU maker's tuning (256 KB at most:
    # two panels taken at once all the same)
    for n, k in [(100, 67), (40, 8200)]:
        w = torch.randn(n, k, generator=g).to(storage).float()
        b = torch.randn(n, generator=g)
        w16, w32 = gemm_cpu.pack(w, storage), gemm_cpu.pack(w)
        for m in list(range(0, 62)) + [97, 131]:
            x = torch.randn(m, k, generator=g)
            for act, bias in ((0, b), (gemm_cpu.ACTIVATIONS["gelu_tanh"], b), (0, None)):
                assert torch.equal(gemm_cpu.linear(x, w16, bias, n, act), gemm_cpu.linear(x, w32, bias, n, act)), (
                    n, m, act, bias is None)


def test_pack_layout():
    w = torch.arange(20 * 3, dtype=torch.float32).view(20, 3)
    p = gemm_cpu.pack(w)
    assert p.shape == (2, 3, 16)
    assert torch.equal(p[0, :, 5], w[5]) and torch.equal(p[1, :, 3], w[19])
    assert p[1, :, 4:].eq(0).all()  # padding past the 20 outputs
    assert gemm_cpu.pack(w.double()).shape == (3, 3, 8)
    with pytest.raises(ValueError, match="2-D float32/float64/bfloat16/float16 CPU weight"):
        gemm_cpu.pack(w.long())
    with pytest.raises(ValueError, match="float64 as float64"):
        gemm_cpu.pack(w.double(), torch.bfloat16)
    # 16-bit storage: the same layout, each weight rounded to nearest as torch rounds it
    w = torch.randn(20, 3, generator=torch.Generator().manual_seed(0))
    for storage in (torch.bfloat16, torch.float16):
        p = gemm_cpu.pack(w, storage)
        assert p.dtype == storage and p.shape == (2, 3, 16)
        assert torch.equal(p[0, :, 5], w[5].to(storage)) and torch.equal(p[1, :, 3], w[19].to(storage))
        assert torch.equal(gemm_cpu.pack(w.to(storage)), p)



@pytestmark_kernel
@pytest.mark.parametrize("storage", SIXTEEN_BIT)
@pytest.mark.parametrize("n,k", [(16, 8), (37, 19), (5, 3), (64, 768), (4000, 96),
                                 # Qwen2.5-0.5B's projections (hidden 896, MLP 4864, 2 KV heads of 64)
                                 # and an LM head of an odd vocabulary size
                                 (128, 896), (4864, 896), (896, 4864), (15193, 896)])
@pytest.mark.parametrize("m", [0, 1, 2, 3, 7, 8, 9, 13, 97])
def test_sixteen_bit_weights_are_the_float32_product_on_the_rounded_weight(storage, n, k, m):
    # float32 x and bias, the weight held in 16 bits: the reference is the exact product on the
    # rounded weight, so the only error left is float32 accumulation (the float32 test's bound,
    # scaled with K: K * 6e-8 * sum |x||w| ~ 4e-4 at K = 4864, outputs of scale ~70)
    g = torch.Generator().manual_seed(n * 1000 + k + m)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g)
    x = torch.randn(m, k, generator=g)
    got = gemm_cpu.linear(x, gemm_cpu.pack(w, storage), b, n)
    assert got.shape == (m, n) and got.dtype == torch.float32
    want = _want(x, w.to(storage), b, "none")
    torch.testing.assert_close(got.double(), want, atol=2e-4 * max(1, k / 768), rtol=0)
    if m == 0:  # no rows: nothing computed, nothing read past the empty input
        return
    # and it is that product, not the float32 weight's: 10x closer to it than to the other (the
    # rounding moves outputs by ~2^-9 (bfloat16) or 2^-11 (float16) relative, float32 sums by ~2^-24)
    off = (got.double() - want).abs().max()
    assert (got.double() - _want(x, w, b, "none")).abs().max() > 10 * off


@pytestmark_kernel
@pytest.mark.parametrize("storage", SIXTEEN_BIT)
@pytest.mark.parametrize("act", list(gemm_cpu.ACTIVATIONS))
def test_sixteen_bit_weights_with_fused_activations(storage, act):
    g = torch.Generator().manual_seed(5)
    n, k, m = 45, 33, 11
    w, b, x = torch.randn(n, k, generator=g), torch.randn(n, generator=g), torch.randn(m, k, generator=g)
    got = gemm_cpu.linear(x, gemm_cpu.pack(w, storage), b, n, gemm_cpu.ACTIVATIONS[act])
    torch.testing.assert_close(got.double(), _want(x, w.to(storage), b, act), atol=2e-4, rtol=0)


@pytestmark_kernel
@pytest.mark.parametrize("storage", [torch.float32] + SIXTEEN_BIT)
@pytest.mark.parametrize("n,k", [(37, 19), (4864, 96), (100, 4864), (5, 3)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_many_rows_are_the_few_rows_kernels_results_bit_for_bit(storage, n, k, threads, monkeypatch):
    # from many_rows_from() rows the kernel runs blocks of 12 rows by two panels (AVX-512) and widens
    # 16-bit weights once per group of panels into a float32 buffer: row for row, the outputs are
    # bit for bit those of calls of 6 rows (the few-rows kernels, 16-bit lines widened in
    # registers), and on 16-bit weights those of the same weights packed as float32. N = 37 and
    # 100: a last panel without a pair; K = 96: groups of many panels; K = 4864: a panel larger
    # than a group; N = 5: fewer panels than threads
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g).to(storage).float()
    b = torch.randn(n, generator=g)
    start = gemm_cpu.many_rows_from(storage)
    if storage != torch.float32:
        assert start is not None and 8 < start <= 64  # above a decode's rows, below a prefill chunk's
    elif start is None:  # float32 weights without AVX-512: one driver for every row count
        start = 48
    # whole blocks of 6 rows (R_MAX), or a tail of 5: the blocks the calls of 6 rows also run (a
    # tail of 1-3 rows accumulates in another order when it is the whole call)
    for m in (-(-start // 6) * 6, -(-start // 6) * 6 + 101):
        x = torch.randn(m, k, generator=g)
        for act in (0, gemm_cpu.ACTIVATIONS["silu"]):
            got = gemm_cpu.linear(x, gemm_cpu.pack(w, storage), b, n, act)
            if storage != torch.float32:
                assert torch.equal(got, gemm_cpu.linear(x, gemm_cpu.pack(w), b, n, act))
            below = torch.cat([gemm_cpu.linear(x[i:i + 6], gemm_cpu.pack(w, storage), b, n, act)
                               for i in range(0, m, 6)])
            assert torch.equal(got, below)
    torch.testing.assert_close(got.double(), _want(x, w, b, "silu"), atol=2e-4 * max(1, k / 768), rtol=0)


@pytestmark_kernel
def test_sixteen_bit_weights_refuse_float64_activations():
    p = gemm_cpu.pack(torch.randn(20, 8), torch.bfloat16)
    with pytest.raises(ValueError, match="float32 with bfloat16/float16 weights"):
        gemm_cpu.linear(torch.randn(3, 8, dtype=torch.float64), p, None, 20)
    assert gemm_cpu.supports(torch.bfloat16) and gemm_cpu.supports(torch.float32)
    assert not gemm_cpu.supports(torch.int8)


@pytestmark_kernel
def test_bad_inputs_raise():
    w = torch.randn(20, 8)
    p = gemm_cpu.pack(w)
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="one dtype"):
        gemm_cpu.linear(x.double(), p, None, 20)
    with pytest.raises(ValueError, match="does not hold 40 outputs of 8 inputs"):
        gemm_cpu.linear(x, p, None, 40)
    with pytest.raises(ValueError, match="does not hold 20 outputs of 7 inputs"):
        gemm_cpu.linear(x[:, :7], p, None, 20)
    with pytest.raises(ValueError, match=r"bias of shape \(19,\)"):
        gemm_cpu.linear(x, p, torch.zeros(19), 20)
    with pytest.raises(ValueError, match="activation code 9"):
        gemm_cpu.linear(x, p, None, 20, 9)
    with pytest.raises(ValueError, match="CPU tensors, got x on meta"):  # no pointer into another device
        gemm_cpu.linear(x.to("meta"), p, None, 20)


@pytestmark_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relu_keeps_nan(dtype):
    x = torch.tensor([[float("nan")], [-2.0], [3.0]], dtype=dtype)
    got = gemm_cpu.linear(x, gemm_cpu.pack(torch.ones(1, 1, dtype=dtype)), None, 1, gemm_cpu.ACTIVATIONS["relu"])
    assert got[0, 0].isnan() and got[1, 0] == 0 and got[2, 0] == 3  # as torch.relu


def test_env_var_disables_the_kernel(monkeypatch, tmp_path, setenv):
    monkeypatch.setattr(gemm_cpu.LIB, "_lib", None)
    monkeypatch.setattr(gemm_cpu.LIB, "_error", None)
    setenv("ORCA_CACHE_DIR", str(tmp_path))
    setenv("ORCA_CPU_KERNELS", "0")
    assert not gemm_cpu.available()
    assert "ORCA_CPU_KERNELS=0" in gemm_cpu.why_unavailable()
    with pytest.raises(RuntimeError, match="C GEMM kernel is unavailable"):
        gemm_cpu.linear(torch.randn(1, 8), gemm_cpu.pack(torch.randn(4, 8)), None, 4)
    assert not list(tmp_path.iterdir())
