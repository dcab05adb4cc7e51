"""The engine's public API on a tiny float64 Llama: joins and leaves, aborts, seeds, bad input."""
import math

import pytest
import torch

import orca_compile
from orca_compile import SamplingParams
from orca_compile.runtime.kv_cache import new_kv_cache
from orca_compile.runtime.model_runner import run_graph
from tests.acceptance.test_engine_vs_hf import hf_generate
from tests.conftest import compiled_preset


def engine(**kw):
    model, cm = compiled_preset("tiny-llama")
    args = dict(max_num_seqs=4, max_num_batched_tokens=32, block_size=4, num_kv_blocks=64) | kw
    return model, orca_compile.optimize(cm, **args)


def finish(eng, limit=500):
    final = {}
    for _ in range(limit):
        if not eng.has_unfinished_requests():
            return final
        for out in eng.step():
            if out.finished:
                final[out.request_id] = out
    raise AssertionError("engine did not drain")


def test_short_request_returns_while_long_one_runs():
    model, eng = engine()
    eng.add_request("long", [5, 6, 7], SamplingParams(max_tokens=30, ignore_eos=True))
    eng.add_request("short", [8, 9], SamplingParams(max_tokens=3, ignore_eos=True))
    steps = 0
    while True:
        outs = {o.request_id: o for o in eng.step()}
        steps += 1
        if "short" in outs and outs["short"].finished:
            break
    assert steps == 3
    assert not outs["long"].finished and len(outs["long"].token_ids) == 3
    assert eng.stats()["num_running"] == 1
    rest = finish(eng)
    assert rest["long"].token_ids == hf_generate(model, [5, 6, 7], SamplingParams(max_tokens=30, ignore_eos=True))[0]


def test_late_request_joins_the_next_iteration():
    model, eng = engine()
    eng.add_request("a", [1, 2, 3], SamplingParams(max_tokens=10, ignore_eos=True))
    for _ in range(3):
        eng.step()
    eng.add_request("b", [4, 5], SamplingParams(max_tokens=2, ignore_eos=True))
    outs = {o.request_id: o for o in eng.step()}
    assert eng.last_iteration.request_ids == ["a", "b"]
    assert outs["b"].new_token_ids and len(outs["a"].token_ids) == 4
    final = finish(eng)
    assert final["b"].token_ids == hf_generate(model, [4, 5], SamplingParams(max_tokens=2, ignore_eos=True))[0]


def test_abort_frees_blocks_and_others_complete():
    model, eng = engine()
    p = SamplingParams(max_tokens=8, ignore_eos=True)
    eng.add_request("a", [1, 2, 3, 4, 5], p)
    eng.add_request("b", [6, 7, 8], p)
    eng.add_request("c", [9] * 6, p)
    eng.step()
    eng.step()
    used = eng.stats()["kv_blocks_used"]
    assert len(eng.block_manager.block_table("b")) == 1  # 4 tokens computed (3 + 1 decode): 1 block of 4
    out = eng.abort_request("b")
    assert out.finished and out.finish_reason == "abort" and len(out.token_ids) == 2
    assert eng.stats()["kv_blocks_used"] == used - 1
    assert eng.abort_request("b") is None and eng.abort_request("nobody") is None
    eng.abort_request("c")
    final = finish(eng)
    assert set(final) == {"a"}
    assert final["a"].token_ids == hf_generate(model, [1, 2, 3, 4, 5], p)[0]
    assert eng.stats()["kv_blocks_used"] == 0


def test_seeded_request_gives_the_same_tokens_whatever_its_batch():
    _, eng = engine()
    params = SamplingParams(max_tokens=12, temperature=1.0, top_k=50, seed=1234, ignore_eos=True)
    alone = eng.generate([[3, 1, 4, 1, 5]], params)[0].token_ids
    crowd = [SamplingParams(max_tokens=n, temperature=0.8, ignore_eos=True) for n in (3, 15, 7)]
    outs = eng.generate([[2, 7], [3, 1, 4, 1, 5], [9] * 20, [6, 6, 6]], [crowd[0], params, crowd[1], crowd[2]])
    assert outs[1].token_ids == alone
    other_seed = eng.generate([[3, 1, 4, 1, 5]], SamplingParams(max_tokens=12, temperature=1.0, top_k=50, seed=99,
                                                               ignore_eos=True))[0].token_ids
    assert other_seed != alone  # the seed matters (12 draws from ~50 tokens cannot all collide)


def test_seeded_request_survives_preemption_unchanged():
    _, roomy = engine(num_kv_blocks=64)
    params = [SamplingParams(max_tokens=14, temperature=1.0, seed=s, ignore_eos=True) for s in range(4)]
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10], [11] * 9, [12, 13]]
    expected = [o.token_ids for o in roomy.generate(prompts, params)]
    _, tight = engine(num_kv_blocks=8, max_num_seqs=4)
    got = tight.generate(prompts, params)
    assert tight.stats()["num_preemptions"] > 0
    assert [o.token_ids for o in got] == expected


BAD_REQUESTS = [
    ("empty prompt", [], {}, "empty"),
    ("id >= vocab", [1, 256], {}, "256.*vocabulary"),
    ("negative id", [-3, 1], {}, "-3.*vocabulary"),
    ("not an int", [1, 2.5], {}, "integers, got 2.5"),
    ("longer than the context", [1] * 500, dict(max_tokens=13), "513.*512"),
    ("never fits the cache", [1] * 200, dict(max_tokens=100), "could never fit"),
    ("text without tokenizer", "hello", {}, "tokenizer"),
    ("max_tokens 0", [1, 2], dict(max_tokens=0), "max_tokens"),
    ("negative temperature", [1, 2], dict(temperature=-1.0), "temperature"),
    ("NaN temperature", [1, 2], dict(temperature=math.nan), "temperature"),
    ("top_p 0", [1, 2], dict(top_p=0.0), "top_p"),
    ("top_p above 1", [1, 2], dict(top_p=1.01), "top_p"),
    ("seed beyond 64 bits", [1, 2], dict(temperature=1.0, seed=2**64), "seed"),
    ("a number, not a prompt", 5, {}, "a prompt is a string or a sequence"),
]


@pytest.mark.parametrize("what,prompt,kw,match", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_fails_alone_and_the_engine_goes_on(what, prompt, kw, match):
    model, eng = engine()
    good = SamplingParams(max_tokens=6, ignore_eos=True)
    eng.add_request("running", [7, 7, 7], good)
    eng.step()
    with pytest.raises(ValueError, match=match):
        eng.add_request("bad", prompt, SamplingParams(**kw))
    assert "bad" not in eng.scheduler.requests
    eng.add_request("after", [1, 2, 3], good)
    final = finish(eng)
    assert final["running"].token_ids == hf_generate(model, [7, 7, 7], good)[0]
    assert final["after"].token_ids == hf_generate(model, [1, 2, 3], good)[0]
    assert eng.stats()["kv_blocks_used"] == 0


def test_numpy_and_tensor_prompts_are_token_ids():
    import numpy as np

    model, eng = engine()
    p = SamplingParams(max_tokens=3, ignore_eos=True)
    outs = eng.generate([np.array([4, 5, 6]), torch.tensor([4, 5, 6]), [4, 5, 6]], p)
    assert outs[0].token_ids == outs[1].token_ids == outs[2].token_ids == hf_generate(model, [4, 5, 6], p)[0]
    assert outs[0].prompt_token_ids == [4, 5, 6] and type(outs[0].prompt_token_ids[0]) is int


def test_duplicate_request_id_is_refused_and_the_first_completes():
    model, eng = engine()
    p = SamplingParams(max_tokens=4, ignore_eos=True)
    eng.add_request("x", [1, 2], p)
    with pytest.raises(ValueError, match="'x' is already in the engine"):
        eng.add_request("x", [3, 4], p)
    final = finish(eng)
    assert final["x"].token_ids == hf_generate(model, [1, 2], p)[0]
    eng.add_request("x", [3, 4], p)  # a finished id may be reused
    assert finish(eng)["x"].token_ids == hf_generate(model, [3, 4], p)[0]


def test_seeded_id_reused_after_an_idle_step_draws_the_same_tokens():
    """The sampler forgets a finished request's generator even if the engine idled in between."""
    _, eng = engine()
    p = SamplingParams(max_tokens=6, temperature=1.0, seed=7, ignore_eos=True)
    first = _run_one(eng, "r", [1, 2, 3], p)
    assert eng.step() == []  # nothing to do
    assert _run_one(eng, "r", [1, 2, 3], p) == first
    assert eng.step() == []
    assert "r" not in eng.executor.runner.sampler._generators  # released though nothing ran


def _run_one(eng, rid, prompt, params):
    eng.add_request(rid, prompt, params)
    return finish(eng)[rid].token_ids


def test_generate_refuses_a_bad_prompt_without_leaving_others_queued():
    _, eng = engine()
    with pytest.raises(ValueError, match="prompt 1: a prompt is a string"):
        eng.generate([[1, 2, 3], 5], SamplingParams(max_tokens=2))
    assert not eng.has_unfinished_requests()
    import numpy as np
    with pytest.raises(ValueError, match="not a single prompt"):
        eng.generate(np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="prompt 1: .*empty"):
        eng.generate([[1, 2], [], [3]], SamplingParams(max_tokens=2))
    assert not eng.has_unfinished_requests() and eng.stats()["kv_blocks_used"] == 0
    with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
        eng.generate([[1], [2], [3]], [SamplingParams(), SamplingParams()])
    with pytest.raises(ValueError, match="params must be a SamplingParams"):
        eng.add_request("y", [1], {"max_tokens": 3})
    assert len(eng.generate([[5, 6]], SamplingParams(max_tokens=3, ignore_eos=True))[0].token_ids) == 3


@pytest.mark.parametrize("kw,match", [
    (dict(max_num_seqs=0), "max_num_seqs"), (dict(max_num_batched_tokens=-1), "max_num_batched_tokens"),
    (dict(block_size=0), "block_size"), (dict(num_kv_blocks=0), "num_kv_blocks"), (dict(policy="lifo"), "policy"),
    (dict(kv_mode="swap-everything"), "kv_mode"), (dict(backend="tensorrt"), "backend"),
    (dict(max_model_len=10_000), "exceeds the model's context of 512"),
    (dict(max_model_len=0), "max_model_len must be an integer >= 1"),
    (dict(chunked_prefill="no"), "chunked_prefill must be True or False"),
    (dict(dtype="float32"), "dtype= and device= apply when optimize"),
])
def test_bad_engine_config_is_refused(kw, match):
    _, cm = compiled_preset("tiny-llama")
    with pytest.raises(ValueError, match=match):
        orca_compile.optimize(cm, **({"num_kv_blocks": 8} | kw))


def test_default_cache_size_covers_max_num_seqs_full_contexts():
    _, cm = compiled_preset("tiny-llama")
    eng = orca_compile.optimize(cm, max_num_seqs=3, block_size=16)
    assert eng.config.num_kv_blocks == 3 * math.ceil(512 / 16)
    assert eng.config.max_model_len == 512
    k, v = eng.executor.runner.kv_cache[0]
    assert k.shape == (96, 16, 2, 16) and k.dtype == torch.float64


def test_bfloat16_model_serves_and_matches_its_own_graph():
    """A bf16 model end to end: tokens equal a manual greedy loop over the same compiled graph
    (HF's own bf16 kernels round differently, so the oracle here is the graph itself), and
    log-probs are computed in float32 (they sum sensibly: each is < 0)."""
    from orca_compile.presets import load_model
    from orca_compile.runtime.batch import RaggedBatch

    cm = orca_compile.compile(load_model("tiny-qwen2", dtype=torch.bfloat16), keep_stages=False)
    eng = orca_compile.optimize(cm, num_kv_blocks=32, block_size=4)
    out = eng.generate([[5, 4, 3, 2]], SamplingParams(max_tokens=5, ignore_eos=True, logprobs=True))[0]
    cache, seq, table = new_kv_cache(cm, 8, 4), [5, 4, 3, 2], [0, 1, 2]
    manual, new, done = [], seq, 0
    for _ in range(5):
        logits = run_graph(cm, RaggedBatch.build([new], [done], [table], 4), cache)
        done += len(new)
        new = [int(logits[0].argmax())]
        manual.append(new[0])
    assert out.token_ids == manual
    assert all(lp < 0 for lp in out.logprobs) and eng.executor.runner.model.layers[0].dtype == torch.bfloat16


@pytest.mark.slow
def test_inductor_backend_gives_the_eager_tokens():
    """torch.compile of the rewritten graph, dynamic in T: same greedy tokens as the eager graph
    (float32, where inductor's fused kernels round differently but not enough to flip an argmax
    on these short runs; the log-probs agree to float32 noise)."""
    from orca_compile.presets import load_model

    cm = orca_compile.compile(load_model("tiny-llama", dtype=torch.float32), keep_stages=False)
    prompts = [[1, 2, 3, 4, 5], [7] * 20, [9, 8]]
    params = SamplingParams(max_tokens=6, ignore_eos=True, logprobs=True)
    kw = dict(num_kv_blocks=64, block_size=4, max_num_batched_tokens=16)
    eager = orca_compile.optimize(cm, **kw).generate(prompts, params)
    compiled = orca_compile.optimize(cm, backend="inductor", **kw).generate(prompts, params)
    assert [o.token_ids for o in compiled] == [o.token_ids for o in eager]
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)


def test_iterations_in_flight_give_hf_tokens_under_kv_pressure_and_aborts():
    """Orca's pipelining driven by the engine, in one process (the local executor runs each
    submitted iteration when it is collected): with 3 iterations in flight, requests joining late
    and a cache that forces preemption, every request gets HF's tokens; an abort while its
    iteration is in flight frees its blocks once that iteration is back."""
    model, eng = engine(num_kv_blocks=9, max_num_seqs=6, max_in_flight=3)
    assert eng.max_in_flight == 3
    prompts = {f"r{i}": ([i + 1, 2 * i + 3, 5, 7][: 2 + i % 3], 4 + i % 4) for i in range(6)}
    final, started, overlapped = {}, 0, False
    eng.add_request("gone", [9, 9, 9], SamplingParams(max_tokens=20, ignore_eos=True, temperature=1.0, seed=7))
    for step in range(400):
        if step % 2 == 0 and started < len(prompts):
            rid = f"r{started}"
            eng.add_request(rid, prompts[rid][0], SamplingParams(max_tokens=prompts[rid][1], ignore_eos=True))
            started += 1
        if step == 3:
            assert "gone" in eng.scheduler.requests  # unfinished (20 tokens) when aborted
            eng.abort_request("gone")
        overlapped |= len(eng._in_flight) >= 2  # two iterations started, neither back yet
        for out in eng.step():
            if out.finished:
                final[out.request_id] = out.token_ids
        if started == len(prompts) and not eng.has_unfinished_requests() and not eng.scheduler.in_flight:
            break
    assert overlapped and eng.stats()["num_preemptions"] > 0
    assert eng.block_manager.num_used_blocks == 0 and not eng.scheduler.in_flight
    # the aborted seeded request's generator was dropped after its last iteration in flight, not before
    eng.step()
    assert "gone" not in eng.executor.runner.sampler._generators
    for rid, (prompt, n) in prompts.items():
        assert final[rid] == hf_generate(model, prompt, SamplingParams(max_tokens=n, ignore_eos=True))[0], rid
