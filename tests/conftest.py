import os

os.environ.setdefault("ORCA_VERIFY_PASSES", "1")  # every flatten rule re-checked on fake tensors

import pytest
import torch

import orca_compile
from orca_compile import env
from orca_compile.presets import load_model

# The SDPA families must match HF to float64 rounding, and so must the mixture-of-experts ones and
# GPT-OSS (eager attention with sinks, softmax in the model's dtype). Gemma2 has no SDPA path in HF:
# its eager attention upcasts the softmax to float32 (``softmax(..., dtype=torch.float32)``), so
# HF itself rounds the probabilities to float32 (relative 6e-8); ours stay float64. Bloom does the
# same (``F.softmax(..., dtype=torch.float32)``; its ALiBi bias itself is exact: the tiny preset's
# four slopes are powers of two). 1e-6 is ~10x that rounding and far below what any masking,
# scale, soft-cap, sink or slope bug produces (>1e-3 on these models).
EXACT = ["tiny-gpt2", "tiny-llama", "tiny-opt", "tiny-qwen2", "tiny-mistral", "tiny-gpt-neox", "tiny-llama-mqa",
         "tiny-mixtral", "tiny-qwen2-moe", "tiny-gpt-oss"]
TOLERANCE = {name: 1e-9 for name in EXACT} | {"tiny-gemma2": 1e-6, "tiny-bloom": 1e-6}
MOE_FAMILIES = ["tiny-mixtral", "tiny-qwen2-moe", "tiny-gpt-oss"]
FAMILIES = list(TOLERANCE)

_CACHE = {}


def compiled_preset(name):
    """(hf_model float64, CompiledModel), compiled once per session."""
    if name not in _CACHE:
        model = hf_oracle(load_model(name, dtype=torch.float64))
        _CACHE[name] = (model, orca_compile.compile(model))
    return _CACHE[name]


def hf_oracle(model):
    """``model``, able to run as the oracle in float64: HF's default experts path
    (``torch.nn.functional.grouped_mm``) refuses float64 on the CPU, so mixture-of-experts models
    use HF's own eager loop over the experts. What orca-compile captures does not depend on it:
    capture routes the experts through ``orca::expert_linear`` whatever is set."""
    if getattr(model.config, "_experts_implementation", None) not in (None, "eager"):
        model.set_experts_implementation("eager")
    return model


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


class BlockPool:
    """Hands out scattered cache blocks (a shuffled pool) so tests exercise real paging."""

    def __init__(self, num_blocks, block_size, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.free = torch.randperm(num_blocks, generator=g).tolist()
        self.block_size = block_size
        self.tables = {}

    def ensure(self, req, num_tokens):
        table = self.tables.setdefault(req, [])
        while len(table) * self.block_size < num_tokens:
            table.append(self.free.pop())
        return table


@pytest.fixture
def setenv(monkeypatch):
    """``setenv(name, value)``: set an environment variable for this test (``None``: unset it) and
    have ``orca_compile.env`` read the variables again; both are undone after the test."""
    def set_(name, value):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(env, "_current", env.Environment.read())
    return set_


def free_loopback_port() -> int:
    """A port free on 127.0.0.1 now (a rendezvous that must be named before the ranks start)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def communicate_all(procs, timeout: float) -> list[tuple[str, str]]:
    """Each process's (stdout, stderr), waiting at most ``timeout`` seconds for each; any still
    running afterwards (a timeout, a failed wait) is killed, so none outlives the test."""
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=30)
    return outs
