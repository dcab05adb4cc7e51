"""The engine end to end against HF ``generate`` on each prompt alone (float64, the oracle).

Requests arrive at random iterations, with random prompt and output lengths, stop tokens and
EOS; each must get exactly HF's token ids and log-probs within 1e-6, under plenty of KV memory,
under KV pressure (paged: preemption by recompute) and with Orca's reservation.
"""
import random

import pytest
import torch

import orca_compile
from orca_compile import SamplingParams
from tests.conftest import compiled_preset

ENGINE_FAMILIES = ["tiny-gpt2", "tiny-llama", "tiny-opt", "tiny-qwen2", "tiny-mistral"]
# mixture-of-experts (Mixtral, Qwen2-MoE), attention sinks (GPT-OSS, also MoE) and ALiBi (Bloom)
NEW_FORMS = ["tiny-mixtral", "tiny-qwen2-moe", "tiny-gpt-oss", "tiny-bloom"]
LOGPROB_TOL = 1e-6


def hf_generate(model, prompt, params: SamplingParams):
    """HF's greedy tokens for ``prompt`` alone, with the request's stops, and their log-probs.

    ``generate`` hands out its logits in float32, so the log-probs come from one float64 forward
    of the eager model over prompt + output instead. The attention mask is explicit: token 0 is
    also the pad id of the tiny presets and must not be masked out of a prompt.
    """
    eos = [] if params.ignore_eos else [model.generation_config.eos_token_id]
    stops = list(params.stop_token_ids) + eos
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=params.max_tokens,
                             do_sample=False, eos_token_id=stops or None, pad_token_id=0)
        tokens = out[0, len(prompt):].tolist()
        logits = model(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1:]
    logprobs = torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist()
    return tokens, logprobs


def random_workload(vocab, n, seed, max_prompt=30, max_out=20):
    rng = random.Random(seed)
    work = []
    for i in range(n):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, max_prompt))]
        params = SamplingParams(max_tokens=rng.randint(1, max_out), logprobs=True, ignore_eos=rng.random() < 0.5)
        work.append((f"req-{i}", prompt, params, rng.randint(0, 12)))  # (id, prompt, params, arrival iteration)
    return work


def with_stop_tokens(model, work):
    """Give every third request a stop token that HF's own output reaches, so "stop" happens."""
    out = []
    for i, (rid, prompt, params, arrival) in enumerate(work):
        if i % 3 == 0 and params.max_tokens >= 3:
            tokens, _ = hf_generate(model, prompt, params)
            if len(tokens) >= 3:
                params = SamplingParams(max_tokens=params.max_tokens, logprobs=True, ignore_eos=params.ignore_eos,
                                        stop_token_ids=(tokens[2],))
        out.append((rid, prompt, params, arrival))
    return out


def serve(engine, work, priority=lambda: 0):
    """Add each request at its arrival iteration (with ``priority()``); step until all finish.
    -> {id: final output}."""
    final, pending, iteration = {}, sorted(work, key=lambda w: w[3]), 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][3] <= iteration:
            rid, prompt, params, _ = pending.pop(0)
            engine.add_request(rid, prompt, params, priority=priority())
        for out in engine.step():
            if out.finished:
                assert out.request_id not in final
                final[out.request_id] = out
        iteration += 1
        assert iteration < 2000, "the engine stopped making progress"
    return final


def check_against_hf(model, work, final):
    reasons = set()
    for rid, prompt, params, _ in work:
        tokens, logprobs = hf_generate(model, prompt, params)
        out = final[rid]
        assert out.token_ids == tokens, f"{rid}: engine {out.token_ids} != HF {tokens}"
        assert out.prompt_token_ids == prompt
        torch.testing.assert_close(torch.tensor(out.logprobs, dtype=torch.float64),
                                   torch.tensor(logprobs, dtype=torch.float64), atol=LOGPROB_TOL, rtol=0)
        expected = "stop" if tokens and tokens[-1] in (set(params.stop_token_ids) | (
            set() if params.ignore_eos else {model.generation_config.eos_token_id})) else "length"
        assert out.finish_reason == expected, rid
        reasons.add(out.finish_reason)
    return reasons


def assert_drained(engine):
    s = engine.stats()
    assert (s["kv_blocks_used"], s["num_waiting"], s["num_running"]) == (0, 0, 0), s
    engine.block_manager.check()


@pytest.mark.parametrize("name", ENGINE_FAMILIES + NEW_FORMS)
def test_staggered_requests_equal_hf_generate(name):
    model, cm = compiled_preset(name)
    work = with_stop_tokens(model, random_workload(cm.vocab_size, 10, seed=1))
    # budget 16 < the longest prompts: prompts are chunked while others decode
    engine = orca_compile.optimize(cm, max_num_seqs=4, max_num_batched_tokens=16, block_size=4, num_kv_blocks=128)
    final = serve(engine, work)
    reasons = check_against_hf(model, work, final)
    assert "stop" in reasons and "length" in reasons
    assert any(0 < it.num_prefill_tokens and it.num_decode_tokens for it in engine.iteration_stats), \
        "no iteration mixed a prefill chunk with decodes"
    assert max(len(it.request_ids) for it in engine.iteration_stats) <= 4
    assert_drained(engine)


@pytest.mark.parametrize("name", ENGINE_FAMILIES)
def test_kv_pressure_preempts_by_recompute_and_still_equals_hf(name):
    model, cm = compiled_preset(name)
    work = random_workload(cm.vocab_size, 10, seed=2)
    longest = max(len(p) + s.max_tokens for _, p, s, _ in work)
    # room for the longest request and little more: running requests outgrow the cache
    engine = orca_compile.optimize(cm, max_num_seqs=8, max_num_batched_tokens=32, block_size=4,
                                   num_kv_blocks=-(-longest // 4) + 2)
    final = serve(engine, work)
    check_against_hf(model, work, final)
    assert engine.stats()["num_preemptions"] > 0
    assert any(out.num_preemptions for out in final.values())
    assert_drained(engine)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_orca_reservation_never_preempts_and_equals_hf(name):
    model, cm = compiled_preset(name)
    work = random_workload(cm.vocab_size, 10, seed=3)
    longest = max(len(p) + s.max_tokens for _, p, s, _ in work)
    engine = orca_compile.optimize(cm, max_num_seqs=8, max_num_batched_tokens=32, block_size=4,
                                   num_kv_blocks=-(-longest // 4) + 2, kv_mode="reserve")
    final = serve(engine, work)
    check_against_hf(model, work, final)
    assert engine.stats()["num_preemptions"] == 0
    # the reservation, not max_num_seqs, bounded the batch
    assert max(it.num_running for it in engine.iteration_stats) < 8
    assert_drained(engine)


def _whole_prompts(chunked):
    """Serve a workload; for each request, whether its whole prompt ran in its first iteration."""
    model, cm = compiled_preset("tiny-llama")
    # all at once, so several prompts compete for one iteration's 24 tokens
    work = [(rid, p, s, 0) for rid, p, s, _ in random_workload(cm.vocab_size, 6, seed=4, max_prompt=20, max_out=6)]
    engine = orca_compile.optimize(cm, max_num_seqs=6, max_num_batched_tokens=24, block_size=4, num_kv_blocks=128,
                                   chunked_prefill=chunked)
    final = serve(engine, work)
    check_against_hf(model, work, final)
    first_feed = {}  # each request's token count in the first iteration it ran in
    for it in engine.iteration_stats:
        assert it.num_prefill_tokens + it.num_decode_tokens <= 24
        for rid, n in zip(it.request_ids, it.num_scheduled_tokens):
            first_feed.setdefault(rid, n)
    whole = [first_feed[rid] == len(prompt) for rid, prompt, _, _ in work]
    assert_drained(engine)
    return whole


def test_without_chunked_prefill_prompts_run_whole():
    assert all(_whole_prompts(chunked=False))


def test_with_chunked_prefill_the_same_workload_splits_a_prompt():
    """The counterpart: this workload does make the chunked scheduler split a prompt, so the
    test above checks something."""
    assert not all(_whole_prompts(chunked=True))


def test_hf_module_is_never_called():
    """Every HF module's forward raises after compiling; the engine must not notice."""
    model, cm = compiled_preset("tiny-llama")
    prompt, params = [3, 1, 4, 1, 5], SamplingParams(max_tokens=6, ignore_eos=True)
    expected, _ = hf_generate(model, prompt, params)

    def boom(*args, **kwargs):
        raise AssertionError("the HF module ran")

    saved = {m: m.forward for m in model.modules()}
    try:
        for m in model.modules():
            m.forward = boom
        engine = orca_compile.optimize(cm, max_num_seqs=2, max_num_batched_tokens=16, block_size=4, num_kv_blocks=32)
        assert engine.generate([prompt], params)[0].token_ids == expected
    finally:
        for m, f in saved.items():
            m.forward = f
