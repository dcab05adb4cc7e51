"""``orca_compile.optimize(model)``: load, compile, size the KV cache, and return a serving engine."""
from __future__ import annotations

import os

import torch

from orca_compile.compiler import CompiledModel, compile
from orca_compile.config import EngineConfig
from orca_compile.runtime.engine import Engine

DEFAULT_MAX_MODEL_LEN = 4096  # for sizing the cache of a model that states no context limit
HOST_MEMORY_FRACTION = 0.25  # of the host's available memory, for a CPU cache sized by default
DEVICE_MEMORY_FRACTION = 0.9  # of the GPU's free memory (after the weights), by default


def optimize(model_or_path, *, max_num_seqs: int = 64, max_num_batched_tokens: int = 512, block_size: int = 16,
             num_kv_blocks: int | None = None, policy: str = "fcfs", tokenizer=None, kv_mode: str = "paged",
             chunked_prefill: bool = True, max_model_len: int | None = None, backend: str = "auto",
             dtype: torch.dtype | str | None = None, device: str | None = None, seed: int = 0) -> Engine:
    """Turn an HF causal LM into an iteration-level serving engine.

    ``model_or_path``: an HF model object (any dtype, CPU or CUDA), a ``CompiledModel``, a preset
    name, a local checkpoint directory or a hub id (``AutoModelForCausalLM``; its tokenizer is
    loaded too when one is there). ``tokenizer``: a tokenizer object or a name/path for
    ``AutoTokenizer``. ``num_kv_blocks=None`` sizes the cache for ``max_num_seqs`` requests of
    the full context, capped at 90% of free GPU memory or 25% of available host memory.
    ``dtype``/``device`` apply when loading by name.
    """
    if isinstance(model_or_path, (str, os.PathLike)):
        from orca_compile.presets import load_model, preset_names

        name = os.fspath(model_or_path)
        model = load_model(name, dtype=dtype, device=device)
        if tokenizer is None and name not in preset_names():
            tokenizer = _try_tokenizer(name)
        compiled = compile(model, keep_stages=False)
    elif dtype is not None or device is not None:
        raise ValueError("dtype= and device= apply when optimize() loads a model by name; move a model object "
                         "with .to() before passing it")
    elif isinstance(model_or_path, CompiledModel):
        compiled = model_or_path  # the caller's: it keeps its unlowered graph (other engines may run it)
    elif isinstance(model_or_path, torch.nn.Module):
        compiled = compile(model_or_path, keep_stages=False)
    else:
        raise ValueError(f"optimize() takes an HF model, a CompiledModel or a checkpoint path, "
                         f"got {type(model_or_path).__name__}")
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer))

    limit = compiled.max_model_len
    if max_model_len is None:
        max_model_len = limit
    elif isinstance(max_model_len, bool) or not isinstance(max_model_len, int) or max_model_len < 1:
        raise ValueError(f"max_model_len must be an integer >= 1 (or None: the model's), got {max_model_len!r}")
    elif limit and max_model_len > limit:
        raise ValueError(f"max_model_len={max_model_len} exceeds the model's context of {limit} tokens")
    if num_kv_blocks is None:
        num_kv_blocks = default_num_kv_blocks(compiled, max_num_seqs, block_size, max_model_len or DEFAULT_MAX_MODEL_LEN)
    config = EngineConfig(num_kv_blocks=num_kv_blocks, max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=max_num_batched_tokens, block_size=block_size, policy=policy,
                          kv_mode=kv_mode, chunked_prefill=chunked_prefill, max_model_len=max_model_len,
                          backend=backend)
    return Engine(compiled, config, tokenizer=tokenizer, seed=seed,
                  owns_compiled=not isinstance(model_or_path, CompiledModel))


def default_num_kv_blocks(compiled: CompiledModel, max_num_seqs: int, block_size: int, max_model_len: int) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
    per_block = compiled.kv_cache_bytes_per_block(block_size)
    wanted = max_num_seqs * -(-max_model_len // block_size)
    if compiled.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(compiled.device)
        budget = DEVICE_MEMORY_FRACTION * free
    else:
        budget = HOST_MEMORY_FRACTION * _host_available_bytes()
    return max(1, min(wanted, int(budget // per_block)))


def _host_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30  # not Linux: assume a modest machine


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def _try_tokenizer(name: str):
    """The checkpoint's tokenizer, or None when it ships none (token-id prompts still work).

    A local directory must hold tokenizer files: given none, ``AutoTokenizer`` would build an
    empty tokenizer from the model type and every text prompt would encode to garbage."""
    from transformers import AutoTokenizer

    if os.path.isdir(name) and not any(os.path.exists(os.path.join(name, f)) for f in TOKENIZER_FILES):
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, TypeError):
        return None
    return tokenizer if len(tokenizer) > 0 else None
