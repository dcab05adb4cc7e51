"""The paged KV cache's tensors: one (k, v) pair per attention layer of a compiled model.

The compiler says what the cache must look like (``CompiledModel.layers``: KV heads, head sizes
and dtype of each layer); the runtime allocates it here. The block manager
(``block_manager.py``) deals in block ids only and never sees these tensors.
"""
from __future__ import annotations

import torch

from orca_compile.kernels import hostmem


def new_kv_cache(model, num_blocks: int, block_size: int, device=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One ``(k, v)`` pair per layer of ``model`` (a ``CompiledModel``, or anything with ``layers``
    and ``device``), ``[num_blocks, block_size, kv_heads, head_dim]`` each, zeroed. On the CPU the
    tensors sit on huge pages: decode attention streams the cache from DRAM every iteration."""
    device = torch.device(device or model.device)

    def zeros(*shape, dtype):
        return hostmem.zeros(shape, dtype) if device.type == "cpu" else torch.zeros(*shape, dtype=dtype, device=device)

    return [(zeros(num_blocks, block_size, spec.num_kv_heads, spec.head_dim, dtype=spec.dtype),
             zeros(num_blocks, block_size, spec.num_kv_heads, spec.v_head_dim, dtype=spec.dtype))
            for spec in model.layers]


DEFAULT_MAX_MODEL_LEN = 4096  # for sizing the cache of a model that states no context limit
HOST_MEMORY_FRACTION = 0.25  # of the host's available memory, for a CPU cache sized by default
DEVICE_MEMORY_FRACTION = 0.9  # of the GPU's free memory (after the weights), by default


def default_num_kv_blocks(info, max_num_seqs: int, block_size: int, max_model_len: int) -> int:
    """Blocks for ``max_num_seqs`` requests of the full context (``max_model_len``, or
    ``DEFAULT_MAX_MODEL_LEN`` when 0), capped at 90% of free GPU memory or 25% of the host's
    available memory. ``info``: the executor's ``ModelInfo`` (cache bytes per token, device)."""
    per_block = info.kv_cache_bytes_per_block(block_size)
    wanted = max_num_seqs * -(-(max_model_len or DEFAULT_MAX_MODEL_LEN) // block_size)
    if info.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(info.device)
        budget = DEVICE_MEMORY_FRACTION * free
    else:
        budget = HOST_MEMORY_FRACTION * host_available_bytes()
    return max(1, min(wanted, int(budget // per_block)))


def host_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30  # not Linux: assume a modest machine
