"""The serving workloads: which model, which requests, and the engine's sizing for them.

W1 (issue 3): a GPT-2-small-shaped model (random weights, float32), 32 requests with prompt
lengths uniform in [16, 128] and output lengths uniform in [8, 64], all arriving at once, seed 0.
Every system must produce each request's full output length (EOS is ignored), so "useful
tokens" is the same number for all: the sum of the requested output lengths.

W2 (issue 18): a Qwen2.5-0.5B-shaped model (random weights) saved in bfloat16 with
``save_pretrained`` and loaded by path, as a user's checkpoint is; 16 requests with prompts
uniform in [32, 256] and outputs in [16, 64], all at once, seed 0, at most 8 in the batch.
"""
from __future__ import annotations

import dataclasses
import random

from orca_compile.config import DEFAULTS


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    model: str
    dtype: str | None  # None: the checkpoint's own (checkpoint_dtype)
    num_requests: int
    prompt_len: tuple[int, int]
    output_len: tuple[int, int]
    seed: int = 0
    # the engine's sizing for this workload: room for every request at once (Orca's max batch
    # size = the request count), the project's default token budget
    max_num_seqs: int = 32
    max_num_batched_tokens: int = DEFAULTS.max_num_batched_tokens
    # the preset saved as a checkpoint in this dtype, which every system loads by path (its dtype
    # then None: as the checkpoint is); None: the preset built in memory in ``dtype``
    checkpoint_dtype: str | None = None

    def source(self) -> str:
        """What the systems load: the preset's name, or the path of its saved checkpoint (written
        once, under the cache directory: ``ORCA_CACHE_DIR``)."""
        if self.checkpoint_dtype is None:
            return self.model
        import os

        from orca_compile import env
        from orca_compile.presets import load_model

        path = env.get().cache_dir / "checkpoints" / f"{self.model}-{self.checkpoint_dtype}"
        if not (path / "config.json").exists():
            import shutil

            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            try:
                load_model(self.model, dtype=self.checkpoint_dtype).save_pretrained(tmp)
                shutil.rmtree(path, ignore_errors=True)  # what a run killed half-way may have left
                os.replace(tmp, path)  # whole or not at all
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return str(path)

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
    # W1's systems on 8 short requests of the tiny model: benchmarks/gpu_check.py's dry run, in CI
    "w1-smoke": Workload("w1-smoke", "tiny-llama", "float32", 8, (8, 32), (4, 12), max_num_seqs=8),
    # W1's requests on a Mixtral-shaped mixture of experts (8 experts, top 2) of about the same size
    "w1-moe": Workload("w1-moe", "mixtral-small-random", "float32", 32, (16, 128), (8, 64)),
    # 8 at once: on this 2-core CPU a decode step of 8 rows is at the machine's balance point for
    # 16-bit weights (2 x 8 flops per 2-byte weight against ~160 GFLOP/s over ~20 GB/s); more rows
    # make the step compute-bound, and 16-bit weights then save nothing (docs/benchmarks.md)
    "w2": Workload("w2", "qwen2.5-0.5b-random", None, 16, (32, 256), (16, 64), max_num_seqs=8,
                   checkpoint_dtype="bfloat16"),
    # W2's shape on the tiny default model: seconds, for the tests
    "w2-tiny": Workload("w2-tiny", "tiny-llama", None, 8, (8, 32), (4, 12), max_num_seqs=8, checkpoint_dtype="bfloat16"),
}


def workload(name: str) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; one of {', '.join(WORKLOADS)}")
    return WORKLOADS[name]
