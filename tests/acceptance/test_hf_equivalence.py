"""The rewritten graph against HF eager on the same float64 weights (the oracle)."""
import pytest
import torch
from transformers import DynamicCache

from orca_compile.runtime.batch import RaggedBatch
from orca_compile.runtime.kv_cache import new_kv_cache
from orca_compile.runtime.model_runner import run_graph
from tests.conftest import TOLERANCE, BlockPool, compiled_preset

BLOCK_SIZE = 4  # small, so contexts cross many block boundaries


def _prompts(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def test_ragged_prefill_equals_hf_per_prompt(family):
    model, cm = compiled_preset(family)
    prompts = _prompts(cm.vocab_size, [5, 23, 1, 9, 17])  # 23 > the sliding windows of 16
    pool = BlockPool(64, BLOCK_SIZE)
    cache = new_kv_cache(cm, 64, BLOCK_SIZE)
    tables = [pool.ensure(r, len(p)) for r, p in enumerate(prompts)]
    batch = RaggedBatch.build(prompts, [0] * len(prompts), tables, BLOCK_SIZE, all_logits=True)
    logits = run_graph(cm, batch, cache)
    assert logits.shape == (sum(map(len, prompts)), cm.vocab_size)
    for r, p in enumerate(prompts):
        got = logits[batch.query_start_loc[r] : batch.query_start_loc[r + 1]]
        torch.testing.assert_close(got, _hf_logits(model, p), atol=TOLERANCE[family], rtol=0)


def test_ragged_decode_equals_hf_with_its_own_cache(family):
    """Requests at different context lengths decode together for several iterations."""
    model, cm = compiled_preset(family)
    prompts = _prompts(cm.vocab_size, [3, 19, 8], seed=1)
    pool = BlockPool(64, BLOCK_SIZE, seed=1)
    cache = new_kv_cache(cm, 64, BLOCK_SIZE)
    tables = [pool.ensure(r, len(p)) for r, p in enumerate(prompts)]
    last = run_graph(cm, RaggedBatch.build(prompts, [0] * 3, tables, BLOCK_SIZE), cache)

    hf_caches, hf_last = [], []
    with torch.no_grad():
        for p in prompts:
            out = model(input_ids=torch.tensor([p]), past_key_values=DynamicCache(config=model.config), use_cache=True)
            hf_caches.append(out.past_key_values)
            hf_last.append(out.logits[0, -1])
    torch.testing.assert_close(last, torch.stack(hf_last), atol=TOLERANCE[family], rtol=0)

    seqs = [list(p) for p in prompts]
    for step in range(5):
        new = [[int(last[r].argmax())] for r in range(3)]
        tables = [pool.ensure(r, len(s) + 1) for r, s in enumerate(seqs)]
        last = run_graph(cm, RaggedBatch.build(new, [len(s) for s in seqs], tables, BLOCK_SIZE), cache)
        with torch.no_grad():
            for r in range(3):
                out = model(input_ids=torch.tensor([new[r]]), past_key_values=hf_caches[r], use_cache=True)
                torch.testing.assert_close(last[r], out.logits[0, -1], atol=TOLERANCE[family], rtol=0,
                                           msg=lambda m: f"step {step} request {r}: {m}")
        for r in range(3):
            seqs[r] += new[r]


def test_mixed_prefill_decode_and_chunked_prefill(family):
    """One iteration holds decodes, a fresh prefill and the second chunk of a chunked prefill."""
    model, cm = compiled_preset(family)
    a, b, c = _prompts(cm.vocab_size, [6, 21, 11], seed=2)
    pool = BlockPool(64, BLOCK_SIZE, seed=2)
    cache = new_kv_cache(cm, 64, BLOCK_SIZE)
    # iteration 1: a prefills whole, b prefills its first 9 tokens (a chunk)
    run_graph(cm, RaggedBatch.build([a, b[:9]], [0, 0], [pool.ensure(0, 6), pool.ensure(1, 9)], BLOCK_SIZE), cache)
    # iteration 2: a decodes one token, b prefills the rest, c arrives and prefills
    a_next = 7
    batch = RaggedBatch.build([[a_next], b[9:], c], [6, 9, 0],
                              [pool.ensure(0, 7), pool.ensure(1, 21), pool.ensure(2, 11)], BLOCK_SIZE, all_logits=True)
    logits = run_graph(cm, batch, cache)
    qsl = batch.query_start_loc.tolist()
    tol = TOLERANCE[family]
    torch.testing.assert_close(logits[qsl[0]], _hf_logits(model, a + [a_next])[-1], atol=tol, rtol=0)
    torch.testing.assert_close(logits[qsl[1]:qsl[2]], _hf_logits(model, b)[9:], atol=tol, rtol=0)
    torch.testing.assert_close(logits[qsl[2]:qsl[3]], _hf_logits(model, c), atol=tol, rtol=0)


def test_empty_request_in_batch_is_harmless():
    """A request with no new tokens this iteration contributes no rows and disturbs nobody."""
    model, cm = compiled_preset("tiny-llama")
    a, b = _prompts(cm.vocab_size, [5, 7], seed=3)
    pool = BlockPool(16, BLOCK_SIZE)
    cache = new_kv_cache(cm, 16, BLOCK_SIZE)
    batch = RaggedBatch.build([a, [], b], [0, 0, 0], [pool.ensure(0, 5), pool.ensure(1, 1), pool.ensure(2, 7)], BLOCK_SIZE)
    logits = run_graph(cm, batch, cache)
    assert logits.shape[0] == 2
    torch.testing.assert_close(logits[1], _hf_logits(model, b)[-1], atol=1e-9, rtol=0)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-4)])
def test_float32_model_matches_hf(dtype, atol):
    """float32: our attention sums in a different order than SDPA; logits are O(1), and a float32
    ulp at that scale is 1e-7, so differences stay a few hundred ulps after 2 layers."""
    import orca_compile
    from orca_compile.presets import load_model

    model = load_model("tiny-qwen2", dtype=dtype)
    cm = orca_compile.compile(model)
    prompts = _prompts(cm.vocab_size, [4, 13])
    pool = BlockPool(16, BLOCK_SIZE)
    logits = run_graph(cm, RaggedBatch.build(prompts, [0, 0], [pool.ensure(r, len(p)) for r, p in enumerate(prompts)],
                                  BLOCK_SIZE), new_kv_cache(cm, 16, BLOCK_SIZE))
    assert logits.dtype == dtype
    for r, p in enumerate(prompts):
        torch.testing.assert_close(logits[r], _hf_logits(model, p)[-1], atol=atol, rtol=0)
