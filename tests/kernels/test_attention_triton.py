"""The Triton kernels of orca.attention against the torch reference, and once through a whole
compiled model.

Without CUDA they run in Triton's interpreter on the CPU (conftest.py turns TRITON_INTERPRET on
before triton is imported) at small shapes; with CUDA the same cases run the compiled kernels.
"""
import math
import os
import sys

import pytest
import torch

if sys.platform.startswith("linux"):
    import triton  # noqa: F401  (in the dev extra on Linux: missing here is a broken install, not a skip)
else:
    pytest.importorskip("triton")  # no triton wheels off Linux

from orca_compile.kernels import attention_cpu, attention_ref, attention_triton, dispatch  # noqa: E402
from orca_compile.runtime.kv_cache import new_kv_cache
from orca_compile.runtime.model_runner import run_graph
from tests.kernels import dense_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    assert os.environ.get("TRITON_INTERPRET") == "1", "tests/kernels/conftest.py should have set TRITON_INTERPRET=1"


# (cached, new) per request: a prefill across blocks, a decode, a short prefill, an empty request, a
# first token (decode at position 0), another decode, a 12-token chunk on a 17-token context, and a
# decode on a context longer than the default KV tile (64), so the online softmax rescales.
MIXED = [(0, 7), (9, 1), (3, 5), (12, 0), (0, 1), (6, 1), (17, 12), (70, 1)]


def _batch(reqs, nh, nkv, hd, hdv, bs, dtype, device=DEVICE, seed=0):
    """Random caches/queries for ``reqs`` with each request's blocks scattered over the pool; block
    table padding is -1 (never to be read)."""
    g = torch.Generator().manual_seed(seed)
    tables, nb_used = [], 0
    for cached, new in reqs:
        tables.append(list(range(nb_used, nb_used + max(1, -(-(cached + new) // bs)))))
        nb_used += len(tables[-1])
    nb = nb_used + 3
    perm = torch.randperm(nb, generator=g).tolist()
    tables = [[perm[b] for b in t] for t in tables]
    kc = torch.randn(nb, bs, nkv, hd, generator=g).to(dtype)  # stale garbage where nothing is written
    vc = torch.randn(nb, bs, nkv, hdv, generator=g).to(dtype)
    t = sum(n for _, n in reqs)
    q = torch.randn(t, nh, hd, generator=g).to(dtype)
    k = torch.randn(t, nkv, hd, generator=g).to(dtype)
    v = torch.randn(t, nkv, hdv, generator=g).to(dtype)
    qsl = torch.tensor([0] + [n for _, n in reqs]).cumsum(0)
    slots = torch.tensor([tables[r][p // bs] * bs + p % bs for r, (c, n) in enumerate(reqs) for p in range(c, c + n)],
                         dtype=torch.long)
    bt = torch.full((len(reqs), max(map(len, tables))), -1, dtype=torch.long)
    for r, tab in enumerate(tables):
        bt[r, : len(tab)] = torch.tensor(tab)
    seq_lens = torch.tensor([c + n for c, n in reqs])
    args = [q, k, v, kc, vc, slots, qsl, seq_lens, bt]
    return [a.to(device) for a in args]


def _run_both(args, scale, window, softcap, **tiles):
    """(kernel out, kernel caches, reference out, reference caches); the reference runs in float32
    on the same (already rounded) inputs, so for half types it is the exact answer to compare to."""
    q, k, v, kc, vc, *meta = args
    kc_t, vc_t = kc.clone(), vc.clone()
    out = attention_triton.attention(q, k, v, kc_t, vc_t, *meta, scale, window, softcap, **tiles)
    kc_r, vc_r = kc.float(), vc.float()
    ref = attention_ref.attention(q.float(), k.float(), v.float(), kc_r, vc_r, *meta, scale, window, softcap)
    return out, (kc_t, vc_t), ref, (kc_r, vc_r)


def _tolerance(dtype, v):
    """float32: both sides sum the same products in a different order (tiles, exp2 vs exp, online
    rescaling): a few ulps of O(1) outputs, measured <= 1.4e-6; 1e-5 leaves a margin while any
    masking or scaling bug moves outputs by > 1e-2. Half types are compared with the float32
    reference on the same (rounded) inputs. Each output is a convex combination of values with
    |v| <= max|v|; the kernel rounds every weight P to the input dtype (relative error <= u, the
    unit roundoff) and rounds the output once (<= u |out| <= u max|v|), so |err| <= 2 u max|v|
    (bfloat16: u = 2^-8, about 0.03 here; float16: u = 2^-11, about 0.004)."""
    if dtype == torch.float32:
        return 1e-5
    u = torch.finfo(dtype).eps / 2
    return 2 * u * float(v.abs().max())


CASES = {
    # id: (block_size, head_dim, v_head_dim, nh, nkv, dtype, window, softcap, tiles)
    "mha-bs4-hd16": (4, 16, 16, 4, 4, torch.float32, 0, 0.0, {}),
    "gqa2-bs8-hd64-window": (8, 64, 64, 8, 4, torch.float32, 5, 0.0, {}),
    "gqa4-bs16-hd128-softcap": (16, 128, 128, 8, 2, torch.float32, 0, 20.0, {}),
    "mqa-bs4-window-softcap-qtiles": (4, 16, 16, 4, 1, torch.float32, 3, 10.0, dict(block_m=16)),
    "gqa3-hd80-vhd48": (8, 80, 48, 6, 2, torch.float32, 0, 0.0, {}),
    "bs32-tile-inside-block": (32, 16, 16, 4, 2, torch.float32, 6, 0.0, dict(block_n=16)),
    "bf16-gqa4-bs16-window": (16, 64, 64, 8, 2, torch.bfloat16, 7, 0.0, dict(block_m=16)),
    "fp16-mqa-bs4-hd128-softcap": (4, 128, 128, 4, 1, torch.float16, 0, 30.0, {}),
    "bf16-tall-tile": (8, 16, 16, 2, 1, torch.bfloat16, 0, 0.0, dict(block_m=64, block_n=32)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference(case):
    bs, hd, hdv, nh, nkv, dtype, window, softcap, tiles = CASES[case]
    args = _batch(MIXED, nh, nkv, hd, hdv, bs, dtype)
    out, (kc, vc), ref, (kc_r, vc_r) = _run_both(args, 1 / math.sqrt(hd), window, softcap, **tiles)
    assert out.shape == (args[0].shape[0], nh, hdv) and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=_tolerance(dtype, args[2]), rtol=0)
    # the store is a copy: bit-exact, including the garbage left in unwritten rows
    assert torch.equal(kc.float(), kc_r) and torch.equal(vc.float(), vc_r)


SINK_CASES = {
    # id: (block_size, head_dim, v_head_dim, nh, nkv, dtype, window, softcap, sinks, alibi, tiles)
    "mha-sinks": (4, 16, 16, 4, 4, torch.float32, 0, 0.0, True, False, {}),
    "gqa4-alibi-window-kv-tiles": (8, 32, 32, 8, 2, torch.float32, 5, 0.0, False, True, dict(block_n=16)),
    "mqa-both-window-softcap-qtiles": (4, 16, 16, 4, 1, torch.float32, 3, 10.0, True, True, dict(block_m=16)),
    "gqa2-both-softcap-tall-tile": (16, 16, 16, 4, 2, torch.float32, 0, 20.0, True, True, dict(block_m=64, block_n=16)),
    "gqa3-hd80-vhd48-both": (8, 80, 48, 6, 2, torch.float32, 6, 0.0, True, True, {}),
    "bf16-gqa4-both-window": (16, 64, 64, 8, 2, torch.bfloat16, 7, 0.0, True, True, dict(block_m=16)),
    "fp16-mqa-sinks-softcap": (4, 32, 32, 4, 1, torch.float16, 0, 30.0, True, False, {}),
}


@pytest.mark.parametrize("case", list(SINK_CASES))
def test_sinks_and_alibi_match_the_dense_oracle(case):
    """Sinks and ALiBi (each alone and both), over decodes, prompts and prompt chunks on a cached
    context with blocks scattered over the pool, against the naive float64 oracle on the same
    (rounded) inputs; the tolerances are _tolerance's (a row's weights now sum to at most 1, which
    the half-precision bound already allows for). Decodes on a context of 70 take two KV tiles of
    the default 64, so the rescaling of a running sum that starts at the sink is checked."""
    bs, hd, hdv, nh, nkv, dtype, window, softcap, with_sinks, with_alibi, tiles = SINK_CASES[case]
    args, contexts = dense_attention.paged_batch(dense_attention.MIXED, nh, nkv, hd, hdv, bs, dtype, device=DEVICE)
    # in the model's dtype, as a graph hands them over; the kernel reads them in float32
    sinks = dense_attention.per_head(nh, -3.0, 4.0, seed=1).to(dtype).to(DEVICE) if with_sinks else None
    slopes = dense_attention.per_head(nh, 0.02, 1.0, seed=2).to(dtype).to(DEVICE) if with_alibi else None
    q, _, v, _, _, _, qsl, *_ = args
    out = attention_triton.attention(*args, 1 / math.sqrt(hd), window, softcap, sinks, slopes, **tiles)
    want = dense_attention.dense_batch(q, qsl.cpu(), contexts, 1 / math.sqrt(hd), window, softcap,
                                       None if sinks is None else sinks.cpu(), None if slopes is None else slopes.cpu())
    torch.testing.assert_close(out.double().cpu(), want, atol=_tolerance(dtype, v), rtol=0)


def test_sinks_of_the_wrong_shape_raise():
    args = _batch([(0, 2)], 4, 2, 16, 16, 4, torch.float32)
    with pytest.raises(ValueError, match=r"sinks must be one value per query head"):
        attention_triton.attention(*args, 0.25, 0, 0.0, torch.zeros(2, device=DEVICE))
    with pytest.raises(ValueError, match=r"alibi_slopes must be one value per query head"):
        attention_triton.attention(*args, 0.25, 0, 0.0, None, torch.zeros(4, 1, device=DEVICE))


HEADS = [(4, 4), (4, 2), (8, 2), (4, 1)]  # GQA ratios 1, 2, 4 and MQA


@pytest.mark.parametrize("bs", [4, 8, 16])
@pytest.mark.parametrize("hd", [16, 64, 128])
def test_block_sizes_head_dims_and_groups(bs, hd):
    """Every block size with every head dim; the head layout, window and soft-cap rotate with them."""
    i = [4, 8, 16].index(bs) + [16, 64, 128].index(hd)
    nh, nkv = HEADS[i % 4]
    window, softcap = [(0, 0.0), (4, 0.0), (0, 15.0), (9, 30.0)][(i + 1) % 4]
    args = _batch(MIXED, nh, nkv, hd, hd, bs, torch.float32, seed=i)
    # KV tiles of 16 positions: several per context, each spanning 1 to 4 cache blocks
    out, (kc, _), ref, (kc_r, _) = _run_both(args, 1 / math.sqrt(hd), window, softcap, block_n=16)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert torch.equal(kc, kc_r)


def test_strided_inputs_and_int32_metadata():
    """q/k/v as views of one fused projection (as a graph produces them), int32 metadata."""
    nh, nkv, hd, bs = 4, 2, 16, 4
    q, k, v, kc, vc, slots, qsl, seq_lens, bt = _batch(MIXED, nh, nkv, hd, hd, bs, torch.float32)
    fused = torch.cat([q, k, v], 1)  # [T, nh + 2 nkv, hd]
    q, k, v = fused[:, :nh], fused[:, nh:nh + nkv], fused[:, nh + nkv:]
    assert not q.is_contiguous()
    qsl, seq_lens, bt = qsl.int(), seq_lens.int(), bt.int()
    out = attention_triton.attention(q, k, v, kc.clone(), vc.clone(), slots, qsl, seq_lens, bt, 0.25, 5, 0.0)
    ref = attention_ref.attention(q.contiguous(), k.contiguous(), v.contiguous(), kc.clone(), vc.clone(), slots,
                                  qsl.long(), seq_lens.long(), bt.long(), 0.25, 5, 0.0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_batch_without_new_tokens():
    args = _batch([(5, 0), (3, 0)], 4, 2, 16, 16, 4, torch.float32)
    q, k, v, kc, vc, *meta = args
    before = kc.clone()
    out = attention_triton.attention(q, k, v, kc, vc, *meta, 0.25)
    assert out.shape == (0, 4, 16) and torch.equal(kc, before)


def test_decode_only_and_prefill_only_batches():
    """The two launch configurations default_config picks between (short and tall query tiles)."""
    decodes = [(c, 1) for c in (0, 3, 4, 5, 15, 16, 17, 30)]
    prefills = [(0, 40), (5, 33)]
    for reqs in (decodes, prefills):
        args = _batch(reqs, 4, 2, 16, 16, 4, torch.float32, seed=len(reqs))
        out, _, ref, _ = _run_both(args, 0.25, 0, 0.0)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_store_kv_skips_negative_slots():
    nb, bs, nkv, hd, hdv = 3, 4, 2, 16, 8
    # the caches start one block into their buffers: a write through slot -1 lands in that guard
    # block (row -1 of block 0) and is seen, instead of corrupting memory outside the tensor
    kbuf = torch.full((nb + 1, bs, nkv, hd), 7.0, device=DEVICE)
    vbuf = torch.full((nb + 1, bs, nkv, hdv), 7.0, device=DEVICE)
    kc, vc = kbuf[1:], vbuf[1:]
    k = torch.randn(5, nkv, hd, device=DEVICE).to(torch.bfloat16)  # cast to the cache dtype on the way in
    v = torch.randn(5, nkv, hdv, device=DEVICE).to(torch.bfloat16)
    slots = torch.tensor([5, -1, 0, 11, -1], device=DEVICE)
    attention_triton.store_kv(k, v, kc, vc, slots)
    kc_r, vc_r = torch.full_like(kc, 7.0), torch.full_like(vc, 7.0)
    attention_ref.store_kv(k, v, kc_r, vc_r, slots)
    assert torch.equal(kc, kc_r) and torch.equal(vc, vc_r)
    assert torch.equal(kc.view(-1, nkv, hd)[[5, 0, 11]], k[[0, 2, 3]].float())
    assert int((kc != 7).any(-1).any(-1).sum()) == 3  # three slots written, nothing else
    assert kbuf[0].eq(7).all() and vbuf[0].eq(7).all()


def test_float64_falls_back_to_reference():
    args = _batch(MIXED, 4, 2, 16, 16, 4, torch.float64)
    q, k, v, kc, vc, *meta = args
    for extra in ((), (torch.arange(4.0, device=DEVICE), torch.full((4,), 0.5, device=DEVICE))):  # sinks, slopes
        out = attention_triton.attention(q, k, v, kc.clone(), vc.clone(), *meta, 0.25, 3, 5.0, *extra)
        ref = attention_ref.attention(q, k, v, kc.clone(), vc.clone(), *meta, 0.25, 3, 5.0, *extra)
        assert out.dtype == torch.float64 and torch.equal(out, ref)


def test_bad_head_counts_raise():
    args = _batch([(0, 2)], 3, 2, 16, 16, 4, torch.float32)
    with pytest.raises(ValueError, match="multiple of 2 KV heads"):
        attention_triton.attention(*args, 0.25)


def test_cpu_tensors_without_interpreter_raise(monkeypatch, setenv):
    setenv("TRITON_INTERPRET", None)
    args = _batch([(0, 2)], 2, 2, 16, 16, 4, torch.float32, device="cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        attention_triton.attention(*args, 0.25)


# ---------------------------------------------------------------------------------------- dispatch

def test_backend_choice(monkeypatch, setenv):
    setenv("TRITON_INTERPRET", "1")  # only dispatch reads it here; nothing is launched
    setenv(dispatch.ENV_VAR, None)
    # auto on the CPU: the C decode kernel where it builds (tests/kernels/test_attention_cpu.py)
    assert dispatch.attention_backend("cpu") == ("cpu" if attention_cpu.available() else "torch")
    setenv(dispatch.ENV_VAR, "triton")
    assert dispatch.attention_backend("cpu") == "triton"
    assert dispatch.attention_backend("cpu", torch.float64) == "torch"
    setenv(dispatch.ENV_VAR, "torch")
    assert dispatch.attention_backend("cuda") == "torch"
    setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="ORCA_ATTENTION_BACKEND='cuda'"):
        dispatch.attention_backend("cpu")
    setenv(dispatch.ENV_VAR, "triton")
    setenv("TRITON_INTERPRET", None)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.attention_backend("cpu")
    monkeypatch.setattr(dispatch, "_triton_present", False)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        dispatch.attention_backend("cuda")
    setenv(dispatch.ENV_VAR, None)
    assert dispatch.attention_backend("cuda") == "torch"  # auto without triton


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
def test_op_runs_the_chosen_backend(monkeypatch, backend, setenv):
    if backend == "cpu" and not attention_cpu.available():
        pytest.skip(f"C decode kernel not built: {attention_cpu.why_unavailable()}")
    if backend == "cpu" and DEVICE != "cpu":
        pytest.skip("the C kernels take CPU tensors; this test's are on the GPU")
    calls = []
    for mod in (attention_ref, attention_triton, attention_cpu):
        real = mod.attention
        monkeypatch.setattr(mod, "attention", lambda *a, _m=mod, _f=real: calls.append(_m) or _f(*a))
    setenv(dispatch.ENV_VAR, backend)
    args = _batch([(2, 3), (5, 1)], 4, 2, 16, 16, 4, torch.float32)
    out = torch.ops.orca.attention(*args, 0.25)
    assert out.shape == (4, 4, 16)
    want = {"triton": attention_triton, "cpu": attention_cpu, "torch": attention_ref}[backend]
    assert calls[0] is want
    # sinks and ALiBi slopes reach every backend positionally, after softcap
    sinks = torch.tensor([0.0, 1.0, 2.0, 3.0], device=DEVICE)
    slopes = torch.tensor([0.5, 0.25, 0.125, 1.0], device=DEVICE)
    out = torch.ops.orca.attention(*(a.clone() for a in args), 0.25, 0, 0.0, sinks, slopes)
    assert calls[-1] is want and len(calls) == 2
    ref = attention_ref.attention(*(a.clone() for a in args), 0.25, 0, 0.0, sinks, slopes)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------- end to end

def _greedy(cm, prompts, steps, block_size=4):
    from orca_compile.runtime.batch import RaggedBatch
    from tests.conftest import BlockPool

    pool = BlockPool(32, block_size)
    cache = new_kv_cache(cm, 32, block_size)
    seqs = [list(p) for p in prompts]
    tables = [pool.ensure(r, len(p)) for r, p in enumerate(prompts)]
    last = run_graph(cm, RaggedBatch.build(prompts, [0] * len(prompts), tables, block_size, device=DEVICE), cache)
    logits = [last]
    for _ in range(steps):
        new = [[int(last[r].argmax())] for r in range(len(seqs))]
        tables = [pool.ensure(r, len(s) + 1) for r, s in enumerate(seqs)]
        last = run_graph(cm, RaggedBatch.build(new, [len(s) for s in seqs], tables, block_size, device=DEVICE), cache)
        logits.append(last)
        for s, n in zip(seqs, new):
            s += n
    return seqs, torch.stack(logits)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gemma2"])  # gemma2: window 16 + soft-cap
def test_greedy_generation_same_tokens_as_reference(monkeypatch, preset, setenv):
    import orca_compile
    from orca_compile.presets import load_model

    cm = orca_compile.compile(load_model(preset, dtype=torch.float32).to(DEVICE))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cm.vocab_size, (n,), generator=g).tolist() for n in (3, 18, 9)]
    setenv(dispatch.ENV_VAR, "torch")
    want_tokens, want_logits = _greedy(cm, prompts, steps=5)
    setenv(dispatch.ENV_VAR, "triton")
    calls = []
    real = attention_triton.attention
    monkeypatch.setattr(attention_triton, "attention", lambda *a: calls.append(1) or real(*a))
    tokens, logits = _greedy(cm, prompts, steps=5)
    assert len(calls) == 6 * cm.num_layers  # every layer of every iteration took the kernel
    assert tokens == want_tokens
    torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=0)  # float32 logits are O(1)


# ---------------------------------------------------------------------------------------- on a GPU

# The interpreter runs kernels as Python and checks no types, layouts or constexpr rules of the
# compiler. So, GPU or not, compile them ahead of time for Hopper and Ampere (Triton ships ptxas;
# no driver needed) in a fresh process, where TRITON_INTERPRET is off.
_AOT = r"""
import sys, warnings
warnings.filterwarnings("ignore")
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from orca_compile.kernels import attention_triton as A

store, paged = A._kernels()
ptrs = {"Q", "K", "V", "OUT", "K_CACHE", "V_CACHE", "SLOTS", "QSL", "SEQ_LENS", "BLOCK_TABLES"}

def build(fn, types, consts, arch, mma=False, **opts):
    sig = {n: ("constexpr" if n in consts else types.get(n, "fp32" if n in ("scale", "softcap") else "i32"))
           for n in fn.arg_names}
    assert all(n in sig for n in consts), set(consts) - set(sig)
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    assert "mma" in kernel.asm["ptx"] or not mma, "half-precision dots should run on tensor cores"

def attn(dt, group, hd, hdv, bm, bn, window, softcap, arch, warps, stages, sinks=False, alibi=False):
    gp = triton.next_power_of_2(group)
    consts = dict(GROUP=group, GROUP_PAD=gp, HEAD_DIM=hd, HEAD_DIM_V=hdv, DIM_PAD=max(16, triton.next_power_of_2(hd)),
                  DIM_V_PAD=max(16, triton.next_power_of_2(hdv)), BLOCK_SIZE=16, BLOCK_Q=bm // gp, BLOCK_M=bm, BLOCK_N=bn,
                  USE_WINDOW=window, USE_SOFTCAP=softcap, USE_SINKS=sinks, USE_ALIBI=alibi,
                  DOT_PRECISION="ieee" if dt == "fp32" else "tf32", WIDEN_DOT=False)
    types = {n: "*" + dt for n in ("Q", "K_CACHE", "V_CACHE", "OUT")} | {n: "*i64" for n in ("QSL", "SEQ_LENS", "BLOCK_TABLES")}
    # sinks and slopes: float32 vectors when on, else None (a constexpr), as attention() passes them
    for name, on in (("SINKS", sinks), ("ALIBI_SLOPES", alibi)):
        if on:
            types[name] = "*fp32"
        else:
            consts[name] = None
    build(paged, types, consts, arch, mma=dt != "fp32", num_warps=warps, num_stages=stages)  # fp32: ieee, no mma

attn("bf16", 4, 128, 128, 16, 64, True, True, 90, 4, 2)    # decode config, Llama-3-8B heads
attn("fp16", 8, 64, 64, 128, 64, False, False, 90, 8, 3)   # tall prefill tile
attn("fp32", 3, 80, 48, 64, 32, True, False, 80, 4, 2)     # ieee dots, odd head dims, a group of 3
attn("bf16", 8, 64, 64, 64, 64, True, False, 90, 4, 2, sinks=True, alibi=True)  # gpt-oss-like sinks, + ALiBi
attn("fp16", 1, 128, 128, 16, 64, False, True, 80, 4, 2, alibi=True)              # MHA with ALiBi alone
build(store, {"K": "*fp32", "V": "*fp32", "K_CACHE": "*bf16", "V_CACHE": "*bf16", "SLOTS": "*i64"},
      dict(NUM_KV_HEADS=3, HEAD_DIM=80, HEAD_DIM_V=48, BLOCK_SIZE=16, HEADS_PAD=4, DIM_PAD=128, DIM_V_PAD=64), 90,
      num_warps=4)
print("compiled")
"""


def test_kernels_compile_for_nvidia_gpus(tmp_path):
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    res = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-4000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="serving shapes only run compiled, on a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_serving_shapes_on_cuda(dtype):
    """Long contexts and both default tile configurations, Llama-3-8B's heads (32 / 8, dim 128)."""
    g = torch.Generator().manual_seed(0)
    decodes = [(int(c), 1) for c in torch.randint(1, 3000, (48,), generator=g)]
    mixes = [decodes, [(0, 700), (1500, 300), (0, 1)] + decodes[:8]]
    for reqs in mixes:
        args = _batch(reqs, 32, 8, 128, 128, 16, dtype, device="cuda")
        out, (kc, _), ref, (kc_r, _) = _run_both(args, 128 ** -0.5, 1024, 0.0)
        torch.testing.assert_close(out.float(), ref, atol=_tolerance(dtype, args[2]), rtol=0)
        assert torch.equal(kc.float(), kc_r)
