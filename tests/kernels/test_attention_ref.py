"""The torch reference of orca.attention, and the C kernel's whole op, against the naive dense
oracle of tests/kernels/dense_attention.py (per request, per head, per query, in float64).

Tolerances. float64: summation order alone, 1e-12 on outputs of magnitude ~1. float32: the
implementations round every score, exponential and sum to float32 (relative 6e-8 each) over at
most ~70 keys, the oracle does not; the largest difference seen is 5e-7, and 1e-5 still fails by
orders of magnitude on a wrong mask, position, head or sink (those move outputs by > 1e-2).
"""
import math

import pytest
import torch

from orca_compile.kernels import attention_cpu, attention_ref
from tests.kernels.dense_attention import MIXED, dense_batch, paged_batch, per_head

IMPLS = {"reference": attention_ref.attention, "C decode kernel": attention_cpu.attention}
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
# sinks from well below the scores (~N(0, 1)) to above them, where the sink takes most of a row's
# weight; slopes from ALiBi's gentle ones to steep ones that all but hide keys a few positions back
EXTRAS = {"plain": (False, False), "sinks": (True, False), "alibi": (False, True), "sinks+alibi": (True, True)}


def _extras(extra, nh, dtype):
    """(sinks, alibi_slopes) for an EXTRAS key, in the model's dtype as a graph hands them over."""
    with_sinks, with_alibi = EXTRAS[extra]
    sinks = per_head(nh, -3.0, 4.0, seed=1).to(dtype) if with_sinks else None
    slopes = per_head(nh, 0.02, 1.0, seed=2).to(dtype) if with_alibi else None
    return sinks, slopes


def _skip_without_c(impl):
    if impl == "C decode kernel" and not attention_cpu.available():
        # reason: no C compiler here; on Linux with one, test_attention_cpu asserts it builds
        pytest.skip(f"C decode kernel not built: {attention_cpu.why_unavailable()}")


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("extra", list(EXTRAS))
@pytest.mark.parametrize("nh,nkv", [(4, 4), (4, 2), (8, 2), (4, 1)])
@pytest.mark.parametrize("window,softcap", [(0, 0.0), (5, 0.0), (0, 20.0), (4, 20.0)])
def test_matches_dense(impl, dtype, extra, nh, nkv, window, softcap):
    """The whole op (store; decodes, fresh prompts, prompt chunks on a cached context, an empty
    request; blocks scattered over the pool) of the reference and of the C path against the naive
    oracle, with and without sinks and ALiBi, windowed and soft-capped, MHA, GQA and MQA."""
    _skip_without_c(impl)
    hd, bs = 8, 4
    args, contexts = paged_batch(MIXED, nh, nkv, hd, hd, bs, dtype)
    sinks, slopes = _extras(extra, nh, dtype)
    q, k, _, kc, _, slots, qsl, *_ = args
    scale = 1 / math.sqrt(hd)
    out = IMPLS[impl](*args, scale, window, softcap, sinks, slopes)
    want = dense_batch(q, qsl, contexts, scale, window, softcap, sinks, slopes)
    torch.testing.assert_close(out.double(), want, atol=TOL[dtype], rtol=0)
    # the new K/V landed in their slots
    assert torch.equal(kc.view(-1, nkv, hd)[slots], k)


def test_sinks_take_weight_from_every_key():
    """A sink far above every score leaves each output near 0 (its weights sum to ~0, not 1); one far
    below changes nothing."""
    args, _ = paged_batch(MIXED, 2, 1, 8, 8, 4, torch.float64, seed=4)
    plain = attention_ref.attention(*(a.clone() for a in args), 0.3)
    high = attention_ref.attention(*(a.clone() for a in args), 0.3, 0, 0.0, torch.full((2,), 60.0))
    low = attention_ref.attention(*(a.clone() for a in args), 0.3, 0, 0.0, torch.full((2,), -60.0))
    assert high.abs().max() < 1e-20 < plain.abs().max()
    torch.testing.assert_close(low, plain, atol=1e-15, rtol=0)


def test_padding_slots_are_not_written():
    kc = torch.zeros(2, 4, 1, 2)
    vc = torch.zeros_like(kc)
    q = torch.ones(2, 1, 2)
    k = torch.full((2, 1, 2), 3.0)
    attention_ref.attention(q, k, k, kc, vc, torch.tensor([1, -1]), torch.tensor([0, 1, 2]), torch.tensor([2, 1]),
              torch.tensor([[0], [1]]), 1.0)
    assert kc.view(-1, 1, 2)[1].eq(3).all() and kc.count_nonzero() == 2
