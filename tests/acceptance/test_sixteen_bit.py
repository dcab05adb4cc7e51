"""16-bit checkpoints on the CPU (issue 18): a bfloat16 or float16 model runs on the ``cpu``
backend as a float32 graph whose linears either multiply in float32 on weights kept in 16 bits
(the C GEMM; ``native_sixteen_bit=False``) or in the 16-bit dtype on oneDNN's packed weights
(``native_sixteen_bit=True``). The default picks the second where the CPU has 16-bit matrix
units (AMX), the first elsewhere; the tests name the path so that every machine runs both, and
check the default's rule apart.

Float32 arithmetic. The oracle is HF on the same checkpoint loaded in float32 (``from_pretrained(dtype=float32)``
upcasts each stored weight exactly): the same weights, the same arithmetic dtype. What differs is
the order of float32 sums (the C GEMM's k loop, our attention's, fused norms), about 1e-7
relative per operation. Measured on these families (bfloat16 and float16, this file's workload,
`benchmarks/sixteen_bit_numerics.py`):
log-probs within 9.5e-7 of HF in float32, against 3e-4 to 2e-2 of HF running the checkpoint in its
16-bit dtype (activations rounded at every op). 2e-5 is 20x the first and 15x below the nearest of
the second, so it passes float32 summation noise and fails 16-bit arithmetic anywhere. Greedy
tokens must be exact: a float32 near-tie would have to fall inside ~1e-6, and these seeds have none.

16-bit multiplies. Each linear rounds its input and its result to the 16-bit dtype, as HF in
that dtype does; the residual stream, norms, attention and the KV cache stay float32, where HF
rounds them too. So the claim tested is: the engine is no farther from the float32 oracle than HF
running the checkpoint in its own dtype, over every token it generates (teacher-forced log-probs),
and every token it picks greedily is the oracle's best or within the 16-bit noise of it.
"""
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import orca_compile
from orca_compile import env, sixteen_bit
from orca_compile.kernels import gemm_cpu
from orca_compile.passes import lower_cpu
from orca_compile.presets import load_model
from tests.acceptance.test_engine_vs_hf import hf_generate, random_workload, serve

pytestmark = pytest.mark.skipif(not gemm_cpu.available(), reason=f"no C GEMM: {gemm_cpu.why_unavailable()}")
LOGPROB_TOL = 2e-5
FAMILIES = ["tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-gemma2", "tiny-mixtral"]
F16 = pytest.param(torch.float16, marks=pytest.mark.skipif(not gemm_cpu.supports(torch.float16),
                                                           reason="this C compiler has no _Float16"))
# the 16-bit multiplies run where oneDNN packs bfloat16 weights (AVX-512 or AVX-NE-CONVERT); on
# other CPUs asking for them is a ValueError, tested below
NATIVE_BF16 = pytest.mark.skipif(not sixteen_bit.native_supported(torch.bfloat16),
                                 reason="oneDNN takes no bfloat16 weights on this CPU (no AVX-512 BW/VL/DQ)")


def _checkpoint(tmp_path_factory, name, dtype):
    path = tmp_path_factory.mktemp(f"{name}-{str(dtype).removeprefix('torch.')}")
    load_model(name, dtype=dtype).save_pretrained(path)
    return path


def _lowering(engine):
    return engine.executor.runner.model.graph_module.meta["orca_lowering"]


@pytest.mark.parametrize("name,dtype", [(name, torch.bfloat16) for name in FAMILIES]
                         # float16: a norm with a bias and biased, tied GPT-2 layers, and RMSNorm / GQA
                         + [pytest.param(name, torch.float16, marks=F16.marks) for name in ("tiny-gpt2", "tiny-qwen2")])
def test_a_sixteen_bit_checkpoint_on_the_cpu_backend_equals_hf_in_float32(name, dtype, tmp_path_factory):
    path = _checkpoint(tmp_path_factory, name, dtype)
    oracle = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if getattr(oracle.config, "_experts_implementation", None) not in (None, "eager"):
        oracle.set_experts_implementation("eager")
    engine = orca_compile.optimize(path, backend="cpu", max_num_seqs=4, max_num_batched_tokens=16, block_size=4,
                                   num_kv_blocks=128, native_sixteen_bit=False)
    assert engine.backend == "cpu"
    lowering = _lowering(engine)
    assert lowering["weight_storage"] == str(dtype).removeprefix("torch.")
    assert lowering["matmul_dtype"] == "float32" and lowering["native_linears"] == 0
    packed = [t for n, t in engine.executor.runner.model.graph_module.named_buffers() if "_packed_" in n]
    assert packed and all(t.dtype == dtype for t in packed)  # every linear weight in 16 bits
    assert lowering["narrow_embeddings"] >= 1
    # HF's RMSNorm runs as the C norm on this path too (the families with one; GPT-2's are layer norms)
    assert (lowering["fused_rms_norms"] > 0) == (oracle.config.model_type != "gpt2")
    work = random_workload(engine.info.vocab_size, 8, seed=4)
    final = serve(engine, work)  # staggered arrivals, prompts chunked while others decode
    for rid, prompt, params, _ in work:
        tokens, logprobs = hf_generate(oracle, prompt, params)
        assert final[rid].token_ids == tokens, rid
        torch.testing.assert_close(torch.tensor(final[rid].logprobs), torch.tensor(logprobs), atol=LOGPROB_TOL, rtol=0)
    engine.shutdown()


def test_the_float32_arithmetic_is_not_hf_in_bfloat16(tmp_path_factory):
    # the tolerance above tells the two apart: HF running the checkpoint in bfloat16 (activations
    # rounded to 8 bits of mantissa) is much farther from the engine than the float32 oracle is
    path = _checkpoint(tmp_path_factory, "tiny-llama", torch.bfloat16)
    prompt = list(range(3, 40))
    engine = orca_compile.optimize(path, backend="cpu", max_num_seqs=2, num_kv_blocks=32, block_size=4,
                                   native_sixteen_bit=False)
    out = engine.generate([prompt], orca_compile.SamplingParams(max_tokens=8, logprobs=True, ignore_eos=True))[0]
    off = {}
    for dtype in (torch.float32, torch.bfloat16):
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + out.token_ids[:-1]])).logits[0, len(prompt) - 1:].float()
        want = torch.log_softmax(logits, -1).gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
        off[dtype] = (torch.tensor(out.logprobs) - want).abs().max().item()
    assert off[torch.float32] < LOGPROB_TOL < 10 * LOGPROB_TOL < off[torch.bfloat16], off
    engine.shutdown()


def test_a_sixteen_bit_model_object_is_widened_on_a_copy():
    model = load_model("tiny-llama", dtype=torch.bfloat16)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    engine = orca_compile.optimize(model, backend="cpu", max_num_seqs=2, num_kv_blocks=32, block_size=4,
                                   native_sixteen_bit=False)
    assert engine.backend == "cpu" and _lowering(engine)["weight_storage"] == "bfloat16"
    after = model.state_dict()  # the caller's model is untouched: its dtype and its values
    assert all(after[n].dtype == t.dtype and torch.equal(after[n], t) for n, t in before.items())
    oracle = load_model("tiny-llama", dtype=torch.bfloat16).float()
    prompt = [5, 9, 2, 7, 7, 1]
    want, _ = hf_generate(oracle, prompt, orca_compile.SamplingParams(max_tokens=6, ignore_eos=True))
    got = engine.generate([prompt], orca_compile.SamplingParams(max_tokens=6, ignore_eos=True))[0].token_ids
    assert got == want
    engine.shutdown()


def test_the_other_paths_keep_their_dtype(tmp_path_factory, caplog):
    path = _checkpoint(tmp_path_factory, "tiny-llama", torch.bfloat16)
    # dtype="float32": plain float32 weights on the cpu backend
    with orca_compile.optimize(path, dtype="float32", max_num_seqs=2, num_kv_blocks=16) as engine:
        assert engine.backend == "cpu" and _lowering(engine)["weight_storage"] == ""
        assert all(t.dtype == torch.float32 for n, t in engine.executor.runner.model.graph_module.named_buffers()
                   if "_packed_" in n)
    # backend="eager": the model in its own dtype, arithmetic included; native_sixteen_bit, which
    # has nothing to choose there (nor on a float32 model), is said to be ignored, not silently
    with caplog.at_level("WARNING", logger="orca_compile"):
        with orca_compile.optimize(path, backend="eager", max_num_seqs=2, num_kv_blocks=16,
                                   native_sixteen_bit=True) as engine:
            gm = engine.executor.runner.model.graph_module
            assert {p.dtype for p in gm.parameters()} == {torch.bfloat16}
        assert any("native_sixteen_bit=True is ignored" in r.getMessage() and "backend 'eager'" in r.getMessage()
                   for r in caplog.records)
        caplog.clear()
        orca_compile.compile(load_model("tiny-llama", dtype=torch.float32), backend="cpu", native_sixteen_bit=False)
        assert any("native_sixteen_bit=False is ignored" in r.getMessage() and "not all bfloat16" in r.getMessage()
                   for r in caplog.records)
        caplog.clear()
    if lower_cpu.available("onednn"):  # onednn takes float32 weights only: the widened graph, and a warning
        with caplog.at_level("WARNING", logger="orca_compile"):
            engine = orca_compile.optimize(path, backend="onednn", max_num_seqs=2, num_kv_blocks=16,
                                           native_sixteen_bit=False)
        assert engine.backend == "onednn"
        assert any("float32 weights on oneDNN" in r.getMessage() for r in caplog.records)
        engine.shutdown()


@pytest.mark.parametrize("native", [False, pytest.param(True, marks=NATIVE_BF16)])
def test_a_weight_the_16_bit_dtype_does_not_hold_stays_float32(native, tmp_path_factory):
    # a checkpoint whose config says bfloat16 but that keeps one module in float32 (as some keep a
    # router or a head): that weight is packed in float32 and multiplied in float32, never
    # rounded, on either path; the others in 16 bits
    model = load_model("tiny-llama", dtype=torch.bfloat16)
    model.lm_head.to(torch.float32)
    with torch.no_grad():
        model.lm_head.weight.add_(1e-4 * torch.randn_like(model.lm_head.weight))  # bits bfloat16 lacks
    path = tmp_path_factory.mktemp("mixed")
    model.save_pretrained(path)
    with orca_compile.optimize(path, backend="cpu", max_num_seqs=2, num_kv_blocks=32, block_size=4,
                               native_sixteen_bit=native) as engine:
        buffers = dict(engine.executor.runner.model.graph_module.named_buffers())
        head = [t for n, t in buffers.items() if "_packed_" in n and "lm_head" in n]
        assert len(head) == 1 and head[0].dtype == torch.float32
        assert {t.dtype for n, t in buffers.items() if "_packed_" in n and "lm_head" not in n} == {torch.bfloat16}
        lowering = _lowering(engine)
        assert lowering["native_linears"] == (lowering["packed_weights"] - 1 if native else 0)
        if native:
            return  # the rest of the numbers are the 16-bit multiplies' (tested below)
        oracle = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        prompt = [5, 9, 2, 7, 7, 1]
        params = orca_compile.SamplingParams(max_tokens=6, ignore_eos=True, logprobs=True)
        want, logprobs = hf_generate(oracle, prompt, params)
        out = engine.generate([prompt], params)[0]
        assert out.token_ids == want
        torch.testing.assert_close(torch.tensor(out.logprobs), torch.tensor(logprobs), atol=LOGPROB_TOL, rtol=0)


@pytest.mark.parametrize("native", [False, pytest.param(True, marks=NATIVE_BF16)])
def test_the_default_takes_a_16_bit_path_by_what_the_cpu_has(native, monkeypatch, caplog, tmp_path_factory):
    # the rule of the defaults (backend="auto", native_sixteen_bit=None), on either kind of CPU:
    # never the eager fallback; with 16-bit matrix units (AMX) the linears multiply in bfloat16 on
    # oneDNN, without them in float32 on 16-bit weights; the log says which
    monkeypatch.setattr(sixteen_bit, "native_sixteen_bit_matmul", lambda dtype: native)
    path = _checkpoint(tmp_path_factory, "tiny-qwen2", torch.bfloat16)
    with caplog.at_level("INFO", logger="orca_compile"):
        engine = orca_compile.optimize(path, max_num_seqs=2, num_kv_blocks=16)
    lowering = _lowering(engine)
    assert engine.backend == "cpu" and lowering["weight_storage"] == "bfloat16"
    if native:
        assert lowering["matmul_dtype"] == "bfloat16" and lowering["native_linears"] == lowering["packed_weights"]
        assert any("multiply in torch.bfloat16 on oneDNN" in r.getMessage() for r in caplog.records)
    else:
        assert lowering["matmul_dtype"] == "float32" and lowering["native_linears"] == 0
        assert any("float32 arithmetic" in r.getMessage() for r in caplog.records)
    engine.shutdown()


def test_a_cap_on_onednn_s_instructions_is_read_as_no_matrix_units(monkeypatch, caplog, tmp_path_factory):
    # ONEDNN_MAX_CPU_ISA below AMX: oneDNN emulates 16-bit GEMMs, so the default takes float32
    # arithmetic on the 16-bit weights (the path of a CPU without AMX) and the log says why. The
    # variables reach orca-compile's reading (env.Environment.read) only, not this process's
    # environment: oneDNN reads it once, and the tests after this one must not inherit a cap
    def environ(**isa):
        base = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")}
        monkeypatch.setattr(env, "_current", env.Environment.read({**base, **isa}))

    environ()
    assert sixteen_bit.onednn_isa_cap(torch.bfloat16) is None
    for value, bf16, fp16 in [("avx512_core_vnni", True, True), ("AVX2", True, True), ("AVX512_CORE_AMX", False, True),
                              ("AVX512_CORE_AMX_FP16", False, False), ("ALL", False, False),
                              ("DEFAULT", False, False), ("NOT_AN_ISA", False, False),
                              ("AVX2 ", False, False)]:  # oneDNN does not strip: a value it ignores
        environ(ONEDNN_MAX_CPU_ISA=value)
        assert (sixteen_bit.onednn_isa_cap(torch.bfloat16) is not None) == bf16, value
        assert (sixteen_bit.onednn_isa_cap(torch.float16) is not None) == fp16, value
    environ(DNNL_MAX_CPU_ISA="AVX512_CORE")  # the older name, read when the new one is unset
    assert sixteen_bit.onednn_isa_cap(torch.bfloat16) == "DNNL_MAX_CPU_ISA=AVX512_CORE"
    environ(DNNL_MAX_CPU_ISA="AVX512_CORE", ONEDNN_MAX_CPU_ISA="")  # empty counts as unset, as in oneDNN
    assert sixteen_bit.onednn_isa_cap(torch.bfloat16) == "DNNL_MAX_CPU_ISA=AVX512_CORE"
    environ(DNNL_MAX_CPU_ISA="AVX512_CORE", ONEDNN_MAX_CPU_ISA="avx512_core_bf16")  # the new name wins
    assert sixteen_bit.onednn_isa_cap(torch.bfloat16) == "ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16"
    assert not sixteen_bit.native_sixteen_bit_matmul(torch.bfloat16)
    assert sixteen_bit.matmul_dtype(torch.bfloat16, None) is None
    why = sixteen_bit.why_not_native(torch.bfloat16)
    assert why is not None and ("ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16" in why or "no AMX" in why)
    path = _checkpoint(tmp_path_factory, "tiny-qwen2", torch.bfloat16)
    with caplog.at_level("INFO", logger="orca_compile"):
        engine = orca_compile.optimize(path, max_num_seqs=2, num_kv_blocks=16)
    assert _lowering(engine)["matmul_dtype"] == "float32"
    (said,) = [r.getMessage() for r in caplog.records if "weights on the CPU" in r.getMessage()]
    assert "float32 arithmetic" in said and f"({why})" in said
    engine.shutdown()


def test_native_sixteen_bit_is_checked(monkeypatch):
    for bad in ("yes", 1):
        with pytest.raises(ValueError, match="native_sixteen_bit must be None"):
            orca_compile.optimize("tiny-llama", native_sixteen_bit=bad)
    # forced on a CPU where oneDNN cannot multiply bfloat16: refused with the reason, not a crash
    # deep in the lowering; left to the default, that CPU takes float32 arithmetic instead
    monkeypatch.setattr(sixteen_bit, "native_supported", lambda dtype: False)
    model = load_model("tiny-llama", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="native_sixteen_bit=True: oneDNN multiplies torch.bfloat16 on CPUs with"):
        orca_compile.compile(model, backend="cpu", native_sixteen_bit=True)
    monkeypatch.setattr(sixteen_bit, "native_sixteen_bit_matmul", lambda dtype: True)
    assert sixteen_bit.matmul_dtype(torch.bfloat16, None) is None


def _teacher_forced(model, prompt, tokens):
    """Log-softmax rows of ``model`` at each generated position of ``prompt + tokens`` (float64)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1:]
    return torch.log_softmax(logits.double(), -1)


@NATIVE_BF16
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-gemma2"])
def test_sixteen_bit_multiplies_are_no_farther_from_float32_than_hf_in_bfloat16(name, tmp_path_factory):
    path = _checkpoint(tmp_path_factory, name, torch.bfloat16)
    oracle = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    engine = orca_compile.optimize(path, backend="cpu", max_num_seqs=4, max_num_batched_tokens=16, block_size=4,
                                   num_kv_blocks=128, native_sixteen_bit=True)
    lowering = _lowering(engine)
    assert lowering["matmul_dtype"] == "bfloat16" and lowering["native_linears"] == lowering["packed_weights"]
    graph = engine.executor.runner.model.graph_module.graph
    casts = [n for n in graph.find_nodes(op="call_function", target=torch.ops.aten._to_copy.default)
             if n.kwargs.get("dtype") == torch.bfloat16]
    inputs = [x.args[0] for x in graph.find_nodes(op="call_function", target=lower_cpu.PACKED_LINEAR)]
    # every linear multiplies a bfloat16 input: a cast, a fused norm's 16-bit result or a 16-bit product...
    assert all(x.meta["val"].dtype == torch.bfloat16 for x in inputs)
    assert len({c.args[0] for c in casts}) == len(casts)  # ...cast once for all the linears that read it
    if name != "tiny-gpt2":  # GPT-2: Q, K and V are one linear, a plain MLP, layer norms
        assert len(set(inputs)) < len(inputs)  # Q, K and V (and gate and up) read one input
        layers = oracle.config.num_hidden_layers
        # act(gate) * up in bfloat16; (Llama, Qwen2) each RMSNorm and the casts around it one call
        assert lowering["sixteen_bit_products"] == layers
        assert name == "tiny-gemma2" or lowering["fused_rms_norms"] == 2 * layers + 1
        # every RMSNorm is one call (Gemma2's four a layer too, their (1 + w) scale after it)
        assert not graph.find_nodes(op="call_function", target=torch.ops.aten.rsqrt.default)
    work = random_workload(engine.info.vocab_size, 8, seed=4)
    final = serve(engine, work)  # staggered arrivals, prompts chunked while others decode
    engine.shutdown()
    ours, theirs, gaps = [], [], []
    for rid, prompt, params, _ in work:
        out = final[rid]
        tokens = torch.tensor(out.token_ids)
        want = _teacher_forced(oracle, prompt, out.token_ids)
        chosen = want.gather(1, tokens[:, None])[:, 0]
        ours.append((torch.tensor(out.logprobs, dtype=torch.float64) - chosen).abs())
        theirs.append((_teacher_forced(hf16, prompt, out.token_ids).gather(1, tokens[:, None])[:, 0] - chosen).abs())
        gaps.append(want.max(-1).values - chosen)  # 0 where the engine picked the oracle's best token
    ours, theirs, gaps = torch.cat(ours), torch.cat(theirs), torch.cat(gaps)
    # no farther than HF in bfloat16 (the mean over every generated token: the maxima of a few
    # dozen tokens are one token each), and far from float32 noise
    # (the 16-bit path really runs: LOGPROB_TOL tells float32 arithmetic apart)
    assert LOGPROB_TOL < ours.mean() <= theirs.mean(), (ours.mean().item(), theirs.mean().item())
    # each greedy pick is the oracle's best, or a near-tie within 16-bit noise of it
    assert gaps.max() <= 4 * theirs.max(), (gaps.max().item(), theirs.max().item())
