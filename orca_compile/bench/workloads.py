"""The serving workloads: which model, which requests, and the engine's sizing for them.

W1 (issue 3): a GPT-2-small-shaped model (random weights, float32), 32 requests with prompt
lengths uniform in [16, 128] and output lengths uniform in [8, 64], all arriving at once, seed 0.
Every system must produce each request's full output length (EOS is ignored), so "useful
tokens" is the same number for all: the sum of the requested output lengths.
"""
from __future__ import annotations

import dataclasses
import random

from orca_compile.config import DEFAULTS


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    model: str
    dtype: str
    num_requests: int
    prompt_len: tuple[int, int]
    output_len: tuple[int, int]
    seed: int = 0
    # the engine's sizing for this workload: room for every request at once (Orca's max batch
    # size = the request count), the project's default token budget
    max_num_seqs: int = 32
    max_num_batched_tokens: int = DEFAULTS.max_num_batched_tokens

    def requests(self, vocab_size: int) -> list[tuple[list[int], int]]:
        """``(prompt token ids, output length)`` per request, the same for every system."""
        rng = random.Random(self.seed)
        out = []
        for _ in range(self.num_requests):
            n = rng.randint(*self.prompt_len)
            out.append(([rng.randrange(vocab_size) for _ in range(n)], rng.randint(*self.output_len)))
        return out


WORKLOADS = {
    "w1": Workload("w1", "gpt2-small-random", "float32", 32, (16, 128), (8, 64)),
    # the same shape on the tiny default model: seconds, for smoke runs and the tests
    "w1-tiny": Workload("w1-tiny", "tiny-llama", "float32", 32, (16, 128), (8, 64)),
    # W1's requests on a Mixtral-shaped mixture of experts (8 experts, top 2) of about the same size
    "w1-moe": Workload("w1-moe", "mixtral-small-random", "float32", 32, (16, 128), (8, 64)),
}


def workload(name: str) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; one of {', '.join(WORKLOADS)}")
    return WORKLOADS[name]
