"""The C attention kernels (kernels/cpu_attention.c: decodes, multi-token requests, the K/V
store) against the torch reference.

float64: the two differ only in summation order, so 1e-12. float32: ~1e-7 relative per score and
softmax over at most a few hundred keys; 2e-6 absolute on outputs of magnitude ~1 leaves ten times
the largest difference seen (3.6e-7) and still fails on any indexing or masking bug (those move
outputs by ~1e-1). Sinks and ALiBi are checked against the naive float64 oracle
(tests/kernels/dense_attention.py) with the same bounds: the float32 kernel rounds what the
reference rounds, and its largest difference from the oracle seen is 5.3e-7.
"""
import sys

import pytest
import torch

from orca_compile.kernels import attention_cpu, attention_ref, cbuild, dispatch
from tests.kernels.dense_attention import dense_batch, paged_batch, per_head

LINUX_WITH_CC = sys.platform.startswith("linux") and cbuild.compiler() is not None
TOL = {torch.float64: 1e-12, torch.float32: 2e-6}


def test_the_kernel_builds_where_a_compiler_is():
    # Not a skip: on Linux with a C compiler (CI) a failed build must fail the run, not quietly
    # hand every decode to the slower reference.
    if LINUX_WITH_CC:
        assert attention_cpu.available(), attention_cpu.why_unavailable()
    else:
        assert not attention_cpu.available() and attention_cpu.why_unavailable()


# reason: no C compiler (not Linux, or none on PATH); the test above fails instead where one is
pytestmark_kernel = pytest.mark.skipif(not attention_cpu.available(),
                                       reason=f"C decode kernel not built: {attention_cpu.why_unavailable()}")


def _case(reqs, nh, nkv, hd, hdv, bs, dtype, seed=0, q_noncontiguous=False):
    g = torch.Generator().manual_seed(seed)
    tables, used = [], 0
    for n in (c + q for c, q in reqs):
        tables.append(list(range(used, used + max(1, -(-n // bs)))))
        used += len(tables[-1])
    nb = used + 2
    perm = torch.randperm(nb, generator=g).tolist()
    tables = [[perm[b] for b in t] for t in tables]
    kc = torch.randn(nb, bs, nkv, hd, generator=g, dtype=torch.float64).to(dtype)
    vc = torch.randn(nb, bs, nkv, hdv, generator=g, dtype=torch.float64).to(dtype)
    t = sum(q for _, q in reqs)
    if q_noncontiguous:  # a view into a fused qkv projection, as the graph hands it over
        q = torch.randn(t, 3 * nh * hd, generator=g, dtype=torch.float64).to(dtype)[:, nh * hd: 2 * nh * hd]
        q = q.view(t, nh, hd)
        assert not q.is_contiguous()
    else:
        q = torch.randn(t, nh, hd, generator=g, dtype=torch.float64).to(dtype)
    qsl = torch.tensor([0] + [n for _, n in reqs]).cumsum(0)
    bt = torch.full((len(reqs), max(map(len, tables))), 7, dtype=torch.long)  # padding: a real block id
    for r, tab in enumerate(tables):
        bt[r, : len(tab)] = torch.tensor(tab)
    seq_lens = torch.tensor([c + n for c, n in reqs])
    return q, kc, vc, qsl, seq_lens, bt


@pytestmark_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
# head dims 12 and 6 are not multiples of float32's 8 lanes (6: nor of float64's 4), so they take
# the scalar dot product; groups of 4 and 5 query heads per KV head fill a block of four (and leave one)
@pytest.mark.parametrize("nh,nkv,hd,hdv,bs", [(4, 4, 16, 16, 4), (8, 2, 64, 64, 16), (4, 1, 80, 80, 1),
                                              (6, 3, 128, 128, 32), (2, 2, 16, 8, 16), (8, 2, 12, 12, 4),
                                              (5, 1, 6, 10, 8)])
@pytest.mark.parametrize("window,softcap", [(0, 0.0), (5, 0.0), (0, 30.0), (16, 50.0)])
def test_decodes_match_the_reference(dtype, nh, nkv, hd, hdv, bs, window, softcap):
    # (cached, new): decodes with 1 token of context, at a block boundary, long; prefills mixed in
    reqs = [(0, 1), (15, 1), (31, 1), (4, 6), (200, 1), (63, 1), (0, 9), (7, 1)]
    q, kc, vc, qsl, lens, bt = _case(reqs, nh, nkv, hd, hdv, bs, dtype, q_noncontiguous=(hd == 64))
    want = torch.full((q.shape[0], nh, hdv), float("nan"), dtype=dtype)
    got = want.clone()
    attention_ref.attend_decodes(q, kc, vc, qsl, lens, bt, hd ** -0.5, window, softcap, want)
    left = attention_cpu.decode_attention(q, kc, vc, qsl, lens, bt, hd ** -0.5, window, softcap, got)
    assert left == sum(n > 1 for _, n in reqs)  # the caller attends these (and only needs to when > 0)
    decode_rows = [int(qsl[r]) for r, (_, n) in enumerate(reqs) if n == 1]
    prefill_rows = [i for i in range(q.shape[0]) if i not in decode_rows]
    torch.testing.assert_close(got[decode_rows], want[decode_rows], atol=TOL[dtype], rtol=0)
    assert got[prefill_rows].isnan().all()  # multi-token requests are left to the caller


@pytestmark_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_count_does_not_change_the_result(threads):
    reqs = [(c, 1) for c in (3, 40, 17, 90, 1, 64)]
    q, kc, vc, qsl, lens, bt = _case(reqs, 8, 2, 32, 32, 8, torch.float64, seed=3)
    one, many = torch.zeros(len(reqs), 8, 32, dtype=torch.float64), torch.zeros(len(reqs), 8, 32, dtype=torch.float64)
    attention_cpu.decode_attention(q, kc, vc, qsl, lens, bt, 0.2, 0, 0.0, one, num_threads=1)
    attention_cpu.decode_attention(q, kc, vc, qsl, lens, bt, 0.2, 0, 0.0, many, num_threads=threads)
    assert torch.equal(one, many)  # each (request, head) is computed by one thread, in one order


@pytestmark_kernel
def test_bad_inputs_raise():
    q, kc, vc, qsl, lens, bt = _case([(3, 1)], 2, 2, 16, 16, 4, torch.float32)
    out = torch.empty(1, 2, 16)
    with pytest.raises(ValueError, match="one dtype"):
        attention_cpu.decode_attention(q.double(), kc, vc, qsl, lens, bt, 0.25, 0, 0.0, out)
    with pytest.raises(ValueError, match="float32 or float64"):
        attention_cpu.decode_attention(q.half(), kc.half(), vc.half(), qsl, lens, bt, 0.25, 0, 0.0, out.half())
    with pytest.raises(ValueError, match="3 query heads"):
        attention_cpu.decode_attention(torch.zeros(1, 3, 16), kc, vc, qsl, lens, bt, 0.25, 0, 0.0,
                                       torch.empty(1, 3, 16))
    with pytest.raises(ValueError, match="contiguous caches"):
        attention_cpu.decode_attention(q, kc.transpose(1, 2), vc, qsl, lens, bt, 0.25, 0, 0.0, out)
    # shapes, metadata and devices the C kernel would read or write past: refused before the call
    with pytest.raises(ValueError, match="shapes do not fit"):
        attention_cpu.decode_attention(q, kc, vc, qsl, lens, bt, 0.25, 0, 0.0, torch.empty(0, 2, 16))
    with pytest.raises(ValueError, match="shapes do not fit"):  # output rows overlapping (stride 0)
        attention_cpu.decode_attention(q, kc, vc, qsl, lens, bt, 0.25, 0, 0.0, torch.empty(1, 1, 16).expand(1, 2, 16))
    with pytest.raises(ValueError, match="shapes do not fit"):
        attention_cpu.decode_attention(q[:, :, :8], kc, vc, qsl, lens, bt, 0.25, 0, 0.0, out)
    with pytest.raises(IndexError, match="point outside"):
        attention_cpu.decode_attention(q, kc, vc, qsl, lens, torch.full_like(bt, kc.shape[0]), 0.25, 0, 0.0, out)
    with pytest.raises(IndexError, match="point outside"):
        attention_cpu.decode_attention(q, kc, vc, qsl, lens * 100, bt, 0.25, 0, 0.0, out)
    with pytest.raises(IndexError, match="point outside"):
        attention_cpu.decode_attention(q, kc, vc, qsl + 1, lens, bt, 0.25, 0, 0.0, out)
    with pytest.raises(ValueError, match="CPU tensors, got cpu, meta"):
        attention_cpu.decode_attention(q, kc, vc, qsl, lens, bt, 0.25, 0, 0.0, out.to("meta"))


# ------------------------------------------------------------------------------ multi-token requests

@pytestmark_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("nh,nkv,hd,hdv,bs", [(4, 4, 16, 16, 4), (8, 2, 64, 64, 16), (4, 1, 80, 80, 1),
                                              (6, 3, 128, 128, 32), (2, 2, 16, 8, 16), (8, 2, 12, 12, 4),
                                              (5, 1, 6, 10, 8), (2, 1, 16, 40, 16)])
@pytest.mark.parametrize("window,softcap", [(0, 0.0), (5, 0.0), (0, 30.0), (16, 50.0)])
def test_prefills_match_the_reference(dtype, nh, nkv, hd, hdv, bs, window, softcap):
    # (cached, new): whole prompts of 2 tokens, of one row block and one key panel exactly (6, 16),
    # and long ones crossing both; chunks on top of a cached context; decodes mixed in (left alone).
    # hdv 10 and 40: value panels cut short; bs 1: every key in its own block
    reqs = [(0, 2), (15, 1), (0, 6), (0, 16), (4, 7), (0, 45), (200, 1), (33, 20), (0, 1), (97, 2)]
    q, kc, vc, qsl, lens, bt = _case(reqs, nh, nkv, hd, hdv, bs, dtype, q_noncontiguous=(hd == 64))
    want = torch.full((q.shape[0], nh, hdv), float("nan"), dtype=dtype)
    got = want.clone()
    attention_ref.attend_prefills(q, kc, vc, qsl, lens, bt, hd ** -0.5, window, softcap, want)
    attention_cpu.prefill_attention(q, kc, vc, qsl, lens, bt, hd ** -0.5, window, softcap, got)
    decode_rows = [int(qsl[r]) for r, (_, n) in enumerate(reqs) if n == 1]
    prefill_rows = [i for i in range(q.shape[0]) if i not in decode_rows]
    torch.testing.assert_close(got[prefill_rows], want[prefill_rows], atol=TOL[dtype], rtol=0)
    assert got[decode_rows].isnan().all()  # one-token requests are the decode kernel's


@pytestmark_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("window", [0, 7])
def test_prefill_thread_count_does_not_change_the_result(threads, window):
    # one long request on one KV head: its query rows are split into more ranges the more threads
    # there are, and every row must still come out bit for bit the same
    reqs = [(9, 70)]
    q, kc, vc, qsl, lens, bt = _case(reqs, 2, 1, 32, 32, 8, torch.float64, seed=6)
    one, many = torch.zeros(70, 2, 32, dtype=torch.float64), torch.zeros(70, 2, 32, dtype=torch.float64)
    attention_cpu.prefill_attention(q, kc, vc, qsl, lens, bt, 0.2, window, 0.0, one, num_threads=1)
    attention_cpu.prefill_attention(q, kc, vc, qsl, lens, bt, 0.2, window, 0.0, many, num_threads=threads)
    assert torch.equal(one, many)


@pytestmark_kernel
def test_prefill_bad_metadata_raises_and_writes_nothing():
    q, kc, vc, qsl, lens, bt = _case([(3, 1), (0, 5)], 2, 2, 16, 16, 4, torch.float32)
    out = torch.full((6, 2, 16), float("nan"))
    bad_ids = bt.clone()
    bad_ids[1, 0] = kc.shape[0]
    for args in ((qsl, lens, bad_ids),                       # a block id past the cache
                 (qsl, torch.tensor([4, 3]), bt),            # a context shorter than its 5 new tokens
                 (qsl, torch.tensor([4, 500]), bt),          # a context longer than its table row
                 (torch.tensor([0, 1, 7]), lens, bt)):       # query_start_loc past the 6 rows
        with pytest.raises(IndexError, match="point outside"):
            attention_cpu.prefill_attention(q, kc, vc, *args, 0.25, 0, 0.0, out)
    assert out.isnan().all()


# ------------------------------------------------------------------------------ sinks and ALiBi

# (cached, new): decodes on short and long contexts, prompts of one row block and one key panel and
# crossing both, chunks on a cached context longer than the window, an empty request
SINK_REQS = [(0, 2), (15, 1), (0, 16), (4, 7), (0, 45), (200, 1), (33, 20), (0, 1), (97, 2), (12, 0)]


@pytestmark_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
# vectorised and scalar dot products (hd 16 / 12 / 6), value panels cut short (hdv 10), every key in
# its own block (bs 1); GQA groups of 1, 4 and 5
@pytest.mark.parametrize("nh,nkv,hd,hdv,bs", [(4, 4, 16, 16, 4), (8, 2, 12, 12, 1), (5, 1, 6, 10, 8)])
@pytest.mark.parametrize("window,softcap", [(0, 0.0), (16, 30.0)])
@pytest.mark.parametrize("sinks,alibi", [(True, False), (False, True), (True, True)])
# one C call (int64 metadata), or store + decode + prefill calls, each checked (int32 metadata)
@pytest.mark.parametrize("calls", ["one", "checked"])
def test_sinks_and_alibi_match_the_dense_oracle(dtype, nh, nkv, hd, hdv, bs, window, softcap, sinks, alibi, calls):
    args, contexts = paged_batch(SINK_REQS, nh, nkv, hd, hdv, bs, dtype, seed=7)
    if calls == "checked":
        args[5:] = [a.int() for a in args[5:]]
    q, qsl = args[0], args[6]
    sinks = per_head(nh, -3.0, 4.0, seed=1).to(dtype) if sinks else None
    slopes = per_head(nh, 0.02, 1.0, seed=2).to(dtype) if alibi else None
    out = attention_cpu.attention(*args, hd ** -0.5, window, softcap, sinks, slopes)
    want = dense_batch(q, qsl, contexts, hd ** -0.5, window, softcap, sinks, slopes)
    torch.testing.assert_close(out.double(), want, atol=TOL[dtype], rtol=0)


@pytestmark_kernel
def test_sinks_and_alibi_in_another_dtype_are_converted():
    """Sinks and slopes in the model's dtype (bfloat16, float32) reach the float64 kernel as their
    exact float64 values."""
    args, _ = paged_batch(SINK_REQS, 4, 2, 16, 16, 4, torch.float64, seed=8)
    sinks, slopes = per_head(4, -3.0, 4.0, seed=1), per_head(4, 0.02, 1.0, seed=2)
    for low in (torch.bfloat16, torch.float32):
        got = attention_cpu.attention(*(a.clone() for a in args), 0.25, 5, 0.0, sinks.to(low), slopes.to(low))
        want = attention_cpu.attention(*(a.clone() for a in args), 0.25, 5, 0.0, sinks.to(low).double(),
                                       slopes.to(low).double())
        assert torch.equal(got, want)


@pytestmark_kernel
def test_sinks_and_slopes_of_the_wrong_shape_raise_before_storing():
    q, k, v, kc, vc, slots, qsl, lens, bt = _mixed_case(torch.float32)
    kc0 = kc.clone()
    for bad in (torch.zeros(3), torch.zeros(4, 1), torch.zeros(8)):  # 4 query heads
        with pytest.raises(ValueError, match=r"one value per query head.*\(4,\)"):
            attention_cpu.attention(q, k, v, kc, vc, slots, qsl, lens, bt, 0.25, 0, 0.0, bad, None)
        with pytest.raises(ValueError, match=r"one value per query head.*\(4,\)"):
            attention_cpu.attention(q, k, v, kc, vc, slots, qsl, lens, bt, 0.25, 0, 0.0, None, bad)
        assert torch.equal(kc, kc0)


# ---------------------------------------------------------------------------------------- store_kv

@pytestmark_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_store_kv_matches_the_reference(dtype):
    g = torch.Generator().manual_seed(4)
    nb, bs, nkv, hd, hdv, t = 6, 4, 3, 16, 8, 7
    kc, vc = torch.randn(nb, bs, nkv, hd, generator=g).to(dtype), torch.randn(nb, bs, nkv, hdv, generator=g).to(dtype)
    # k as a view into a fused projection (row stride > nkv * hd), v contiguous; slot -1 is padding
    k = torch.randn(t, 2 * nkv * hd, generator=g).to(dtype)[:, nkv * hd:].view(t, nkv, hd)
    v = torch.randn(t, nkv, hdv, generator=g).to(dtype)
    slots = torch.tensor([5, 0, -1, 23, 12, 13, -1])
    want_k, want_v, got_k, got_v = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    attention_ref.store_kv(k, v, want_k, want_v, slots)
    attention_cpu.store_kv(k, v, got_k, got_v, slots)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    assert not torch.equal(got_k, kc)  # it wrote something
    with pytest.raises(IndexError, match="outside the cache's 24 slots"):
        attention_cpu.store_kv(k, v, got_k, got_v, torch.tensor([0, 1, 2, 3, 4, 24, 5]))
    assert torch.equal(got_k, want_k)  # a bad slot list writes nothing
    with pytest.raises(ValueError, match="3 slots for 7 tokens"):
        attention_cpu.store_kv(k, v, got_k, got_v, slots[:3])


@pytestmark_kernel
def test_store_kv_leaves_shapes_that_do_not_fit_to_the_reference():
    # the C path trusts shapes; anything else goes to the reference, which raises instead of writing
    # past a tensor (a smaller v cache; k with fewer heads than the cache)
    kc, vc = torch.zeros(6, 4, 2, 8), torch.zeros(6, 4, 2, 8)
    k, v = torch.randn(1, 2, 8), torch.randn(1, 2, 8)
    with pytest.raises((IndexError, RuntimeError)):
        attention_cpu.store_kv(k, v, kc, vc[:2], torch.tensor([23]))
    assert vc[2:].eq(0).all()  # nothing written past the 2-block view
    kc.zero_()
    with pytest.raises(RuntimeError):
        attention_cpu.store_kv(k[:, :1], v, kc, vc, torch.tensor([3]))
    assert kc.eq(0).all() and vc.eq(0).all()


# ---------------------------------------------------------------------------------------- building

@pytest.fixture
def fresh_loader(monkeypatch, tmp_path, setenv):
    """The loader as on first use, building into an empty cache directory."""
    monkeypatch.setattr(attention_cpu.LIB, "_lib", None)
    monkeypatch.setattr(attention_cpu.LIB, "_error", None)
    setenv("ORCA_CACHE_DIR", str(tmp_path))
    return tmp_path


@pytest.mark.skipif(not LINUX_WITH_CC, reason="building needs Linux and a C compiler")
def test_build_goes_to_the_cache_dir_and_is_reused(fresh_loader, monkeypatch):
    assert attention_cpu.available()
    built = list(fresh_loader.glob("cpu_attention-*.so"))
    assert len(built) == 1 and list(fresh_loader.iterdir()) == built  # no temporary file left
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(attention_cpu.LIB, "_lib", None)
    calls = []
    real_run = cbuild.subprocess.run
    monkeypatch.setattr(cbuild.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or real_run(cmd, **kw))
    assert attention_cpu.available()
    assert built[0].stat().st_mtime_ns == stamp
    assert all("--version" in c for c in calls)  # only the compiler's version was asked, nothing rebuilt


@pytest.mark.skipif(not LINUX_WITH_CC, reason="building needs Linux and a C compiler")
def test_another_compiler_gets_its_own_build(fresh_loader, monkeypatch, setenv, tmp_path):
    # a wrapper around the same compiler (the same --version line) that adds a flag: what a user's
    # CC may be, and what an A/B of two builds of a kernel uses; its library is a build of its own
    assert attention_cpu.available()
    first = set(fresh_loader.glob("cpu_attention-*.so"))
    wrapper = tmp_path / "cc-wrapper"
    wrapper.write_text(f'#!/bin/sh\nexec {cbuild.compiler()} -DORCA_TEST_WRAPPER=1 "$@"\n')
    wrapper.chmod(0o755)
    setenv("CC", str(wrapper))
    monkeypatch.setattr(attention_cpu.LIB, "_lib", None)
    assert attention_cpu.available()
    built = set(fresh_loader.glob("cpu_attention-*.so"))
    assert len(first) == 1 and len(built) == 2 and first < built


def test_the_cpu_makers_tuning_is_read_from_cpuinfo(tmp_path):
    amd, intel = tmp_path / "amd", tmp_path / "intel"
    amd.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2\n")
    intel.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu avx2\n")
    # Intel's measured tuning for Intel; every other maker (and a machine without the file) keeps
    # the defaults measured on the AMD machine
    assert cbuild.tuning_flags(str(intel)) == ["-DORCA_CPU_INTEL=1"]
    assert cbuild.tuning_flags(str(amd)) == []
    assert cbuild.tuning_flags(str(tmp_path / "absent")) == []


@pytest.mark.skipif(not LINUX_WITH_CC, reason="building needs Linux and a C compiler")
def test_the_tuning_define_reaches_the_compiler_and_its_own_build(fresh_loader, monkeypatch):
    assert attention_cpu.available()
    first = set(fresh_loader.glob("cpu_attention-*.so"))
    calls = []
    real_run = cbuild.subprocess.run
    monkeypatch.setattr(cbuild.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or real_run(cmd, **kw))
    other = [] if cbuild.tuning_flags() else ["-DORCA_CPU_INTEL=1"]  # the other maker's tuning
    monkeypatch.setattr(cbuild, "tuning_flags", lambda: other)
    monkeypatch.setattr(attention_cpu.LIB, "_lib", None)
    assert attention_cpu.available()
    built = set(fresh_loader.glob("cpu_attention-*.so"))
    assert len(first) == 1 and len(built) == 2 and first < built
    compiles = [c for c in calls if "--version" not in c]
    assert compiles and all(("-DORCA_CPU_INTEL=1" in c) == bool(other) for c in compiles)


def test_no_compiler_means_the_reference(fresh_loader, monkeypatch, setenv):
    monkeypatch.setattr(cbuild, "compiler", lambda: None)
    assert not attention_cpu.available()
    assert "no C compiler" in attention_cpu.why_unavailable()
    setenv(dispatch.ENV_VAR, None)
    assert dispatch.attention_backend("cpu", torch.float32) == "torch"
    setenv(dispatch.ENV_VAR, "cpu")
    with pytest.raises(RuntimeError, match="no C compiler"):
        dispatch.attention_backend("cpu", torch.float32)


def test_env_var_disables_the_kernel(fresh_loader, monkeypatch, setenv):
    setenv("ORCA_CPU_KERNELS", "0")
    assert not attention_cpu.available()
    assert "ORCA_CPU_KERNELS=0" in attention_cpu.why_unavailable()
    assert not list(fresh_loader.iterdir())


@pytest.mark.skipif(not LINUX_WITH_CC, reason="building needs Linux and a C compiler")
def test_a_broken_compiler_means_the_reference(fresh_loader, monkeypatch, tmp_path_factory, setenv):
    fake = tmp_path_factory.mktemp("bin") / "cc"
    fake.write_text("#!/bin/sh\necho 'fake cc 1.0'\nexit 1\n")
    fake.chmod(0o755)
    setenv("CC", str(fake))
    assert not attention_cpu.available()
    assert "failed to build" in attention_cpu.why_unavailable()
    assert not list(fresh_loader.glob("*.so"))  # nothing half-written left behind


# ---------------------------------------------------------------------------------------- dispatch

@pytestmark_kernel
def test_auto_picks_the_kernel_on_the_cpu(monkeypatch, setenv):
    setenv(dispatch.ENV_VAR, None)
    assert dispatch.attention_backend("cpu", torch.float32) == "cpu"
    assert dispatch.attention_backend("cpu", torch.float64) == "cpu"  # the float64 acceptance tests run it
    assert dispatch.attention_backend("cpu", torch.bfloat16) == "torch"
    setenv(dispatch.ENV_VAR, "torch")
    assert dispatch.attention_backend("cpu", torch.float32) == "torch"
    setenv(dispatch.ENV_VAR, "cpu")
    assert dispatch.attention_backend("cpu", torch.float64) == "cpu"
    with pytest.raises(RuntimeError, match="float32/float64 CPU tensors"):
        dispatch.attention_backend("cpu", torch.bfloat16)


def _mixed_case(dtype, meta_dtype=torch.int64):
    """A decode on a 5-token context and a 3-token prompt: (q, k, v, caches, metadata) for the whole op."""
    q, kc, vc, qsl, lens, bt = _case([(5, 1), (0, 3)], 4, 2, 16, 16, 4, dtype)
    k = torch.randn(4, 2, 16, dtype=torch.float64).to(dtype)
    v = torch.randn(4, 2, 16, dtype=torch.float64).to(dtype)
    slots = torch.tensor([int(bt[0, 1]) * 4 + 1, int(bt[1, 0]) * 4, int(bt[1, 0]) * 4 + 1, int(bt[1, 0]) * 4 + 2])
    return q, k, v, kc, vc, slots.to(meta_dtype), qsl.to(meta_dtype), lens.to(meta_dtype), bt.to(meta_dtype)


@pytestmark_kernel
def test_op_runs_the_kernel_in_one_call(monkeypatch, setenv):
    # what the engine feeds (int64 metadata, contiguous caches): one C call a layer; anything else
    # (here int32 metadata) the three checked calls. Both give the reference's output and caches.
    lib = attention_cpu.LIB.load()
    calls = []
    real_fused = lib.orca_attention
    monkeypatch.setattr(lib, "orca_attention", lambda *a: calls.append("fused") or real_fused(*a))
    for name in ("store_kv", "decode_attention", "prefill_attention"):
        real = getattr(attention_cpu, name)
        monkeypatch.setattr(attention_cpu, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    setenv(dispatch.ENV_VAR, None)
    for meta_dtype, want_calls in ((torch.int64, ["fused"]),
                                   (torch.int32, ["store_kv", "decode_attention", "prefill_attention"])):
        calls.clear()
        q, k, v, kc, vc, *meta = _mixed_case(torch.float64, meta_dtype)
        ref_kc, ref_vc = kc.clone(), vc.clone()
        ref = attention_ref.attention(q, k, v, ref_kc, ref_vc, *(m.long() for m in meta), 0.25)
        out = torch.ops.orca.attention(q, k, v, kc, vc, *meta, 0.25)
        assert calls == want_calls
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
        assert torch.equal(kc, ref_kc) and torch.equal(vc, ref_vc)


@pytestmark_kernel
def test_direct_call_of_a_lowered_graph_keeps_sinks_and_alibi():
    """lower_cpu.call_attention_directly retargets orca::attention nodes to attention_cpu.attention
    with the node's arguments as they are: 14 with sinks and slopes, 12 in graphs made before
    them (their defaults then apply). Both run and give what the op gives."""
    from orca_compile.ops import ATTENTION
    from orca_compile.passes.lower_cpu import call_attention_directly

    q, k, v, kc, vc, *meta = _mixed_case(torch.float64)
    sinks, slopes = per_head(4, -1.0, 2.0, seed=1), per_head(4, 0.1, 0.5, seed=2)
    inputs = [q, k, v, kc, vc, *meta, sinks, slopes]
    for extra in ((), (sinks, slopes)):
        graph = torch.fx.Graph()
        nodes = [graph.placeholder(f"x{i}") for i in range(len(inputs))]
        for node, value in zip(nodes, inputs):
            node.meta["val"] = value
        graph.output(graph.call_function(ATTENTION, (*nodes[:9], 0.25, 0, 0.0, *nodes[9:9 + len(extra)])))
        gm = call_attention_directly(torch.fx.GraphModule(torch.nn.Module(), graph))
        assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [attention_cpu.attention]
        want = torch.ops.orca.attention(q, k, v, kc.clone(), vc.clone(), *meta, 0.25, 0, 0.0, *extra)
        got = gm(q, k, v, kc.clone(), vc.clone(), *meta, sinks, slopes)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert not torch.equal(got, attention_cpu.attention(q, k, v, kc.clone(), vc.clone(), *meta, 0.25))


@pytestmark_kernel
def test_one_call_refuses_bad_metadata_and_slots_before_writing():
    q, k, v, kc, vc, slots, qsl, lens, bt = _mixed_case(torch.float32)
    kc0, vc0 = kc.clone(), vc.clone()
    bad_ids = bt.clone()
    bad_ids[1, 0] = kc.shape[0]
    bad_decode_ids = bt.clone()
    bad_decode_ids[0, 0] = -1
    for args, err, match in (((slots, qsl, lens, bad_ids), IndexError, "point outside"),     # a block id past the cache
                             ((slots, qsl, lens, bad_decode_ids), IndexError, "point outside"),  # in the decode's row
                             ((slots, qsl, lens * 100, bt), IndexError, "point outside"),   # contexts past the tables
                             ((slots, qsl + 1, lens, bt), IndexError, "point outside"),     # rows past the 4 there are
                             ((slots.clone().fill_(kc.shape[0] * 4), qsl, lens, bt), IndexError,
                              f"outside the cache's {kc.shape[0] * 4} slots"),
                             ((slots[:3], qsl, lens, bt), ValueError, "3 slots for 4 tokens")):
        with pytest.raises(err, match=match):
            attention_cpu.attention(q, k, v, kc, vc, *args, 0.25)
        assert torch.equal(kc, kc0) and torch.equal(vc, vc0), match  # nothing stored
    for args, match in (((torch.zeros(4, 3, 16), k, v), "3 query heads"),
                        ((q, k[:, :1], v), "shapes do not fit"),      # fewer K heads than the cache
                        ((q, k, v[:3]), "shapes do not fit")):        # fewer V rows than tokens
        with pytest.raises(ValueError, match=match):
            attention_cpu.attention(*args, kc, vc, slots, qsl, lens, bt, 0.25)
        assert torch.equal(kc, kc0) and torch.equal(vc, vc0), match


@pytestmark_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["decode", "prefill"])
@pytest.mark.parametrize("sinks", [False, True])
def test_large_scores_do_not_overflow(dtype, kind, sinks):
    # scores in the thousands: exp() overflows unless the row maximum is subtracted first; sinks in
    # the same range must join that maximum (some rows' sink is above all of their scores)
    reqs = [(40, 1), (9, 1)] if kind == "decode" else [(0, 30), (12, 9)]
    q, kc, vc, qsl, lens, bt = _case(reqs, 4, 2, 32, 32, 8, dtype, seed=5)
    q = q * 400
    extra = dict(sinks=torch.tensor([-3000.0, 500.0, 2000.0, 4000.0], dtype=dtype) if sinks else None)
    want, got = torch.zeros(q.shape[0], 4, 32, dtype=dtype), torch.zeros(q.shape[0], 4, 32, dtype=dtype)
    getattr(attention_ref, f"attend_{kind}s")(q, kc, vc, qsl, lens, bt, 1.0, 0, 0.0, want, **extra)
    getattr(attention_cpu, f"{kind}_attention")(q, kc, vc, qsl, lens, bt, 1.0, 0, 0.0, got, **extra)
    assert got.isfinite().all()
    torch.testing.assert_close(got, want, atol=1e-4 if dtype == torch.float32 else 1e-10, rtol=0)
