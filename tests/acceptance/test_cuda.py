"""The engine against HF on the same device: a GPU when there is one (the engine's CUDA path: Triton
attention and K/V store, the ragged batch, sampling and the KV cache on the device), else the CPU,
so that every CI run checks the test's own logic. ``benchmarks/gpu_check.py`` runs this module on a
GPU and copies the measured distances (``record_property``) into its report.

Requests arrive at random iterations (staggered: prompts chunked while others decode), or under KV
pressure (few blocks: running requests are preempted and recomputed).

float32 (matmuls at full precision: no TF32). Greedy tokens equal HF ``generate`` on each prompt
alone, except where HF's own logits make the two tokens a tie: there the sequences may part, and
the rest of that request is not compared (a different but equally likely token is no error; a
token HF ranks lower by more than the tie margin is). Log-probs of the common prefix within
``FP32_LOGPROB_TOL``: float32's unit roundoff is 6e-8, and what the engine does differently (one
flattened matmul per layer instead of HF's batched ones, Triton's or the C kernel's summation order
in attention) moves a log-prob of these tiny models by ~1e-6 (measured on the CPU: the ``fp32_*``
properties); 1e-4 leaves a margin of ~100x and is far below the ~0.5 that attending to the wrong
context gives (a shifted context on tiny-llama: 0.55).

bfloat16. Tokens of two bfloat16 runs part early (HF's own bfloat16 run differs from its float32
one within a few tokens), so each system is judged against the exact model on its own tokens:
the same weights upcast to float32, teacher-forced over the system's prompt + output. Two
distances per system: ``err``, its log-probs' largest distance from the exact ones, and ``gap``,
how far below the exact model's best token its chosen token was (0 for an exact greedy choice).
The engine's must be within ``BF16_FACTOR`` x HF bfloat16's own ``err`` (at least
``BF16_FLOOR``, 4 units of bfloat16 roundoff, so a lucky HF run does not set an impossible
bar): the engine rounds at other places than HF (Triton accumulates attention in float32,
rounds P to bfloat16 before P @ V) but should not be worse than HF's own rounding by more than
that. A context or masking bug is ~0.5 away on these models.
"""
import copy
import dataclasses
import math

import pytest
import torch

import orca_compile
from orca_compile.kernels import dispatch
from orca_compile.presets import load_model
from tests.acceptance.test_engine_vs_hf import assert_drained, random_workload, serve

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PRESET = "tiny-llama"
FP32_LOGPROB_TOL = 1e-4
FP32_TIE = 2 * FP32_LOGPROB_TOL  # two log-probs each within the tolerance of HF's may swap order
BF16_FACTOR = 2.0
BF16_FLOOR = 4 * 2.0 ** -8
# On a GPU, "auto" is the rewritten graph on ATen's kernels with orca.attention in Triton. On the
# CPU, bfloat16 runs "eager" (the model in its own dtype, as on a GPU) rather than auto's float32
# arithmetic on 16-bit weights, which is a CPU-only choice with tests of its own (test_sixteen_bit).
BACKEND = {"cuda": {torch.float32: "auto", torch.bfloat16: "auto"},
           "cpu": {torch.float32: "auto", torch.bfloat16: "eager"}}[DEVICE.type]
# the workload: 10 requests on a GPU; on the CPU (every CI run) a smaller one that still chunks
# prompts and preempts, so the module costs seconds there
SIZES = dict(num_requests=10, max_prompt=30, max_out=20) if DEVICE.type == "cuda" else \
    dict(num_requests=5, max_prompt=24, max_out=10)
CASES = {
    # budget 16 < the longest prompts: prompts are chunked while others decode
    "staggered": lambda longest: dict(max_num_seqs=4, max_num_batched_tokens=16, block_size=4, num_kv_blocks=128),
    # room for the longest request and little more: running requests outgrow the cache
    "kv_pressure": lambda longest: dict(max_num_seqs=8, max_num_batched_tokens=32, block_size=4,
                                        num_kv_blocks=-(-longest // 4) + 2),
}


@pytest.fixture(autouse=True)
def full_precision_matmuls():
    """No TF32 in float32 matmuls (a GPU's default for cuBLAS may be TF32 elsewhere): float32 means
    float32 here, for HF and the engine alike."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def hf_greedy(model, prompt, params) -> list[int]:
    """HF ``generate``'s greedy tokens for ``prompt`` alone, on the model's device. The attention
    mask is explicit: token 0 is also the pad id of the tiny presets."""
    ids = torch.tensor([prompt], device=model.device)
    eos = None if params.ignore_eos else model.generation_config.eos_token_id
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=params.max_tokens,
                             do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def forced(model, prompt, tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced over ``prompt + tokens``: the log-prob (float32, on the host) ``model`` gives
    each of ``tokens``, and the best log-prob it gives any token at that step."""
    ids = torch.tensor([prompt + tokens[:-1]], device=model.device)
    with torch.no_grad():
        logits = model(ids, attention_mask=torch.ones_like(ids)).logits[0, len(prompt) - 1:]
    lp = logits.float().log_softmax(-1)
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device)[:, None])[:, 0]
    return chosen.cpu(), lp.max(-1).values.cpu()


def run_engine(model, case, dtype, seed):
    work = random_workload(model.config.vocab_size, SIZES["num_requests"], seed=seed, max_prompt=SIZES["max_prompt"],
                           max_out=SIZES["max_out"])
    if case == "kv_pressure":
        # arrivals closer together (still staggered), so the requests overlap; every output its full
        # length, so the preemptions depend on the scheduler alone, not on where EOS falls (which
        # differs between dtypes and devices)
        work = [(rid, prompt, dataclasses.replace(params, ignore_eos=True), arrival // 4)
                for rid, prompt, params, arrival in work]
    longest = max(len(p) + s.max_tokens for _, p, s, _ in work)
    engine = orca_compile.optimize(model, backend=BACKEND[dtype], **CASES[case](longest))
    final = serve(engine, work)
    if case == "staggered":
        assert any(0 < it.num_prefill_tokens and it.num_decode_tokens for it in engine.iteration_stats), \
            "no iteration mixed a prefill chunk with decodes"
    else:
        assert engine.stats()["num_preemptions"] > 0, "the KV-pressure case preempted nothing"
    assert_drained(engine)
    engine.shutdown()
    return work, final


def test_the_engine_runs_on_the_devices_kernels():
    """On a GPU the attention of every dtype served here is Triton's, compiled (not interpreted)."""
    for dtype in (torch.float32, torch.bfloat16):
        want = "triton" if DEVICE.type == "cuda" else dispatch.attention_backend("cpu", dtype)
        assert dispatch.attention_backend(DEVICE, dtype) == want
    if DEVICE.type == "cuda":
        import triton

        assert not triton.knobs.runtime.interpret, "TRITON_INTERPRET is on: the kernels would not be compiled"


@pytest.mark.parametrize("case", list(CASES))
def test_float32_equals_hf_on_the_same_device(case, record_property):
    model = load_model(PRESET, dtype=torch.float32).to(DEVICE)
    work, final = run_engine(model, case, torch.float32, seed=11)
    worst, ties, compared = 0.0, 0, 0
    for rid, prompt, params, _ in work:
        out, want = final[rid], hf_greedy(model, prompt, params)
        got = out.token_ids
        common = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        hf_lp, hf_best = forced(model, prompt, want)
        if common < min(len(got), len(want)):  # they part here: only at a tie of HF's own logits
            engine_choice, _ = forced(model, prompt, want[:common] + [got[common]])
            behind = float(hf_best[common] - engine_choice[common])
            assert behind <= FP32_TIE, (f"{rid}: token {common}: the engine took {got[common]}, HF {want[common]}, "
                                        f"which HF ranks {behind:.2e} above it (tie margin {FP32_TIE:.0e})")
            ties += 1
        else:
            assert got == want, f"{rid}: engine {got} != HF {want}"
            assert out.finish_reason == ("length" if len(got) == params.max_tokens else "stop"), rid
        if common:
            err = (torch.tensor(out.logprobs[:common], dtype=torch.float64) - hf_lp[:common].double()).abs().max()
            worst = max(worst, float(err))
            compared += common
    record_property("fp32_max_logprob_err", worst)
    record_property("fp32_tokens_compared", compared)
    record_property("fp32_requests_parted_at_a_tie", ties)
    assert worst <= FP32_LOGPROB_TOL, f"log-probs {worst:.2e} from HF's (tolerance {FP32_LOGPROB_TOL:.0e})"
    assert ties <= len(work) // 2, f"{ties} of {len(work)} requests parted from HF: too many ties to be chance"


def _distances(model, exact, work, outputs) -> tuple[float, float]:
    """(err, gap) of one system's tokens and log-probs against the exact model; see the module."""
    err = gap = 0.0
    for (_, prompt, _, _), (tokens, logprobs) in zip(work, outputs):
        lp, best = forced(exact, prompt, tokens)
        err = max(err, float((torch.tensor(logprobs) - lp).abs().max()))
        gap = max(gap, float((best - lp).max()))
    return err, gap


@pytest.mark.parametrize("case", list(CASES))
def test_bfloat16_is_as_close_to_the_exact_model_as_hf_bfloat16(case, record_property):
    model = load_model(PRESET, dtype=torch.bfloat16).to(DEVICE)
    exact = copy.deepcopy(model).float()  # the same weights, upcast: the model bfloat16 approximates
    work, final = run_engine(model, case, torch.bfloat16, seed=13)
    engine_out = [(final[rid].token_ids, final[rid].logprobs) for rid, _, _, _ in work]
    hf_out = []
    for _, prompt, params, _ in work:
        tokens = hf_greedy(model, prompt, params)
        hf_out.append((tokens, forced(model, prompt, tokens)[0].tolist()))
    engine_err, engine_gap = _distances(model, exact, work, engine_out)
    hf_err, hf_gap = _distances(model, exact, work, hf_out)
    bound = BF16_FACTOR * max(hf_err, BF16_FLOOR)
    for name, value in (("engine_err", engine_err), ("engine_gap", engine_gap), ("hf_err", hf_err),
                        ("hf_gap", hf_gap), ("bound", bound)):
        record_property(f"bf16_{name}", value)
    assert math.isfinite(engine_err) and engine_err <= bound, \
        f"engine log-probs {engine_err:.3g} from the exact model's; HF bfloat16's {hf_err:.3g} (bound {bound:.3g})"
    assert engine_gap <= bound, \
        f"the engine chose a token {engine_gap:.3g} below the exact model's best; HF bfloat16: {hf_gap:.3g}"
