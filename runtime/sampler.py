"""Next-token choice for every row of an iteration's logits.

Greedy rows take the argmax. Sampled rows apply temperature, then top-k, then top-p, and draw with
the exponential race: ``argmax(p / E)`` with ``E ~ Exp(1)`` i.i.d. picks token i with probability
``p_i`` (it is the Gumbel-max trick in another form) and needs one random number per vocabulary
entry from whichever generator the row owns. A request with a seed owns a ``torch.Generator``
seeded once and advanced only by its own draws, so its tokens do not depend on its batch mates,
on the batch order, or on preemptions. Rows without a seed share one engine-wide generator.

Log-probs are those of the model's own distribution (``log_softmax`` of the raw logits), as HF's
``output_logits`` gives them, whatever temperature or filters chose the token.
"""
from __future__ import annotations

import torch

from orca_compile.kernels import argmax_cpu
from orca_compile.runtime.request import SamplingParams


class Sampler:
    def __init__(self, device, seed: int = 0):
        self.device = torch.device(device)
        self._shared = torch.Generator(device=self.device).manual_seed(seed)
        self._generators: dict[str, torch.Generator] = {}

    def forget(self, request_ids) -> None:
        for rid in request_ids:
            self._generators.pop(rid, None)

    def sample(self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams]
               ) -> tuple[list[int], list[float] | None]:
        """``logits`` [N, V]: one row per request in ``request_ids``; returns N token ids and,
        if any row asked for them, N log-probs."""
        n = logits.shape[0]
        assert n == len(request_ids) == len(params)
        if all(p.greedy for p in params):
            tokens = _argmax(logits)
        else:
            tokens = self._sample_mixed(logits, request_ids, params)
        if not any(p.logprobs for p in params):
            return tokens.tolist(), None
        wide = logits if logits.dtype.itemsize >= 4 else logits.float()  # bf16's logsumexp is too coarse
        chosen = wide.gather(1, tokens[:, None])[:, 0]
        logprobs = chosen - torch.logsumexp(wide, dim=-1)
        if tokens.device.type == "cpu":
            return tokens.tolist(), logprobs.tolist()
        return to_host_at_once(tokens, logprobs)

    def _sample_mixed(self, logits, request_ids, params):
        tokens = _argmax(logits)
        rows = [i for i, p in enumerate(params) if not p.greedy]
        idx = torch.tensor(rows, device=logits.device)
        scaled = logits[idx].float()
        temps = torch.tensor([params[i].temperature for i in rows], device=logits.device)
        scaled = scaled / temps[:, None]
        scaled = _top_k(scaled, [params[i].top_k for i in rows])
        scaled = _top_p(scaled, [params[i].top_p for i in rows])
        probs = torch.softmax(scaled, dim=-1)
        noise = torch.empty_like(probs)
        unseeded = [j for j, i in enumerate(rows) if params[i].seed is None]
        if unseeded:
            noise[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=probs.device).exponential_(
                generator=self._shared)
        for j, i in enumerate(rows):
            p = params[i]
            if p.seed is not None:
                g = self._generators.get(request_ids[i])
                if g is None:
                    g = self._generators[request_ids[i]] = torch.Generator(device=self.device).manual_seed(p.seed)
                noise[j].exponential_(generator=g)
        tokens[idx] = (probs / noise).argmax(dim=-1)
        return tokens


def to_host_at_once(tokens: torch.Tensor, logprobs: torch.Tensor) -> tuple[list[int], list[float]]:
    """Token ids and log-probs read back from a GPU in one copy (one wait for the device) instead of
    two: both as float64 rows, which hold every token id (< 2**53) and every float32 log-prob exactly."""
    ids, lps = torch.stack([tokens.double(), logprobs.double()]).tolist()
    return [int(t) for t in ids], lps


def _argmax(logits):
    """Row-wise argmax: the C kernel on CPU float32/float64 logits (0.9 ms -> ~0.1 ms on W1's
    [32, 50257]), else torch; both give the first maximum, or the first NaN."""
    if logits.device.type == "cpu":
        tokens = argmax_cpu.argmax(logits)
        if tokens is not None:
            return tokens
    return logits.argmax(dim=-1)


def _top_k(scaled, ks):
    if not any(ks):
        return scaled
    vocab = scaled.shape[1]
    k = torch.tensor([k if 0 < k < vocab else vocab for k in ks], device=scaled.device)
    kth = scaled.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
    return scaled.masked_fill(scaled < kth, float("-inf"))


def _top_p(scaled, ps):
    if all(p >= 1.0 for p in ps):
        return scaled
    top_p = torch.tensor(ps, device=scaled.device, dtype=scaled.dtype)
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # keep the smallest prefix whose mass reaches top_p: a token goes when the mass before it does
    mass_before = probs.cumsum(dim=-1) - probs
    drop = mass_before >= top_p[:, None]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(scaled).scatter_(1, order, sorted_logits)
