"""The sampler on fixed logits: greedy, filters, the distribution it draws from, seeds."""
import math

import pytest
import torch

from orca_compile.runtime.request import SamplingParams
from orca_compile.runtime.sampler import Sampler


def logits_rows(n, vocab=50, seed=0):
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


def test_greedy_is_argmax_and_logprobs_are_the_models():
    logits = logits_rows(3)
    tokens, lps = Sampler("cpu").sample(logits, ["a", "b", "c"], [SamplingParams(logprobs=True)] * 3)
    assert tokens == logits.argmax(-1).tolist()
    expected = torch.log_softmax(logits, -1)[torch.arange(3), logits.argmax(-1)]
    assert torch.allclose(torch.tensor(lps, dtype=torch.float64), expected, atol=1e-12, rtol=0)


def test_top_k_and_top_p_keep_draws_inside_their_sets():
    logits = logits_rows(1, seed=1).repeat(400, 1)
    top5 = set(logits[0].topk(5).indices.tolist())
    s = Sampler("cpu", seed=1)
    ids = [f"r{i}" for i in range(400)]
    tokens, _ = s.sample(logits, ids, [SamplingParams(temperature=2.0, top_k=5)] * 400)
    assert set(tokens) <= top5 and len(set(tokens)) > 1
    probs = torch.softmax(logits[0], -1)
    order = probs.argsort(descending=True)
    nucleus = set(order[: int((probs[order].cumsum(0) < 0.6).sum()) + 1].tolist())  # smallest set with mass >= 0.6
    tokens, _ = s.sample(logits, ids, [SamplingParams(temperature=1.0, top_p=0.6)] * 400)
    assert set(tokens) <= nucleus and len(set(tokens)) > 1


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = logits_rows(4, seed=2)
    s = Sampler("cpu")
    greedy = logits.argmax(-1).tolist()
    assert s.sample(logits, list("abcd"), [SamplingParams(temperature=1.0, top_k=1)] * 4)[0] == greedy
    assert s.sample(logits, list("abcd"), [SamplingParams(temperature=1.0, top_p=1e-9)] * 4)[0] == greedy


def test_vanishing_temperature_is_greedy_not_overflow():
    logits = logits_rows(3, seed=5)
    for t in (1e-6, 1e-40, 1e-50):
        tokens, _ = Sampler("cpu").sample(logits, list("abc"), [SamplingParams(temperature=t)] * 3)
        assert tokens == logits.argmax(-1).tolist(), t


def test_draws_follow_the_tempered_distribution():
    """20000 draws of a 4-token distribution: each frequency within 4 standard errors."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]], dtype=torch.float64).repeat(20000, 1)
    temperature = 0.7
    tokens, _ = Sampler("cpu", seed=3).sample(logits, [str(i) for i in range(20000)],
                                              [SamplingParams(temperature=temperature)] * 20000)
    p = torch.softmax(logits[0] / temperature, -1)
    freq = torch.bincount(torch.tensor(tokens), minlength=4).double() / 20000
    se = (p * (1 - p) / 20000).sqrt()
    assert ((freq - p).abs() < 4 * se).all(), (freq, p)


def test_a_seeded_row_ignores_its_batch_mates():
    logits = logits_rows(5, seed=4)
    params = SamplingParams(temperature=1.0, seed=123)
    alone = [Sampler("cpu").sample(logits[2:3], ["x"], [params])[0][0] for _ in range(1)]
    s = Sampler("cpu", seed=99)
    mates = [SamplingParams(temperature=1.5), SamplingParams(), params, SamplingParams(temperature=0.5, seed=7),
             SamplingParams(temperature=1.0)]
    in_batch = s.sample(logits, list("abxde"), mates)[0][2]
    assert in_batch == alone[0]
    # the generator advances per draw: a second draw continues the same stream as alone
    solo = Sampler("cpu")
    seq_alone = [solo.sample(logits[2:3], ["x"], [params])[0][0] for _ in range(5)]
    s2 = Sampler("cpu", seed=5)
    seq_batch = [s2.sample(logits.flip(0), list("edxba"), mates[::-1])[0][2] for _ in range(5)]
    assert seq_alone == seq_batch


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=2.5), "max_tokens"), (dict(temperature=-0.1), "temperature"),
    (dict(temperature=math.nan), "temperature"), (dict(temperature=math.inf), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=math.nan), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(seed="x"), "seed"), (dict(seed=2**64), "seed"), (dict(seed=-(2**63) - 1), "seed"),
    (dict(stop_token_ids=5), "stop_token_ids"), (dict(stop_token_ids=(-1,)), "stop_token_ids"),
])
def test_invalid_sampling_params_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_tokens_and_logprobs_read_back_together_are_the_same_values():
    """Off the CPU the sampler reads ids and log-probs back in one copy (``to_host_at_once``); done
    here, it must give exactly what two ``tolist()`` calls give: large ids, float32 log-probs."""
    from orca_compile.runtime.sampler import to_host_at_once

    tokens = torch.tensor([0, 7, 151_935, 2 ** 31 - 1])
    logprobs = torch.randn(4, generator=torch.Generator().manual_seed(0)).float() - 20.0
    ids, lps = to_host_at_once(tokens, logprobs)
    assert ids == tokens.tolist() and all(type(t) is int for t in ids)
    assert lps == logprobs.tolist()
