"""Custom ops that the rewritten graphs call, registered with ``torch.library``.

Every op has a fake (meta) implementation so that it survives ``torch.export``, fake-tensor
propagation and ``torch.compile``, shows by name in every dump, and can be found with one
``graph.find_nodes(op="call_function", target=torch.ops.orca.attention.default)``.

``orca::attention`` is the split attention of Orca's selective batching. Its inputs are this
iteration's queries, keys and values of *all* requests, flattened to ``[T, heads, head_dim]``, the
paged KV cache of its layer, and the ragged batch's metadata:

===================  ==================  ===========================================================
argument             shape / type        meaning
===================  ==================  ===========================================================
q                    [T, nh, hd]         queries of every new token of every request
k, v                 [T, nkv, hd]        keys/values of the new tokens (written into the cache)
k_cache, v_cache     [nb, bs, nkv, hd]   the layer's paged cache (mutated in place)
slot_mapping         [T] int64           cache slot (``block * bs + offset``) of each new token; -1: skip
query_start_loc      [R + 1] int64       request r's new tokens are ``q[query_start_loc[r]:...[r+1]]``
seq_lens             [R] int64           request r's context length *including* its new tokens
block_tables         [R, max_blocks]     request r's cache blocks in order (padding: any value)
scale                float               softmax scale
sliding_window       int                 0: none; w: a query at position p sees keys p-w+1 .. p
softcap              float               0: none; c: scores become c * tanh(scores / c)
sinks                [nh] or None        per-head sink logit: takes part in the softmax's normaliser
                                         (``sum_j exp(s_j) + exp(sink_h)``) and attends to nothing
alibi_slopes         [nh] or None        ALiBi: score of query position i, key position j gains
                                         ``slope_h * (j - i)`` (after scale and soft-cap)
===================  ==================  ===========================================================

Each request's queries sit at the last ``q_len`` positions of its context and attend causally.
The score of query i (position p_i) and key j (position p_j, p_j <= p_i) is
``s = softcap(scale * q_i . k_j) + slope_h * (p_j - p_i)``; the output is
``sum_j exp(s_j - m) v_j / (sum_j exp(s_j - m) + exp(sink_h - m))`` with ``m`` the row's maximum
(sink included); without sinks the sink term is absent, without slopes the bias is 0.
"""
from __future__ import annotations

import time

import torch

_LIB = "orca"


@torch.library.custom_op(f"{_LIB}::attention", mutates_args=("k_cache", "v_cache"))
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int = 0,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    from orca_compile.kernels import dispatch

    return dispatch.attention(
        q, k, v, k_cache, v_cache, slot_mapping, query_start_loc, seq_lens, block_tables,
        scale, sliding_window, softcap, sinks, alibi_slopes,
    )


@attention.register_fake
def _attention_fake(q, k, v, k_cache, v_cache, slot_mapping, query_start_loc, seq_lens,
                    block_tables, scale, sliding_window=0, softcap=0.0, sinks=None, alibi_slopes=None):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1])


ATTENTION = torch.ops.orca.attention.default


_GROUP = [None]  # the tensor-parallel process group of this rank (None: the default group)


def set_tensor_parallel_group(group) -> None:
    """The group ``orca::all_reduce`` and ``orca::all_gather`` run over: a worker of a pipeline
    stage with tensor parallelism sets its stage's ranks; by default the whole process group."""
    _GROUP[0] = group


def _group_size() -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(_GROUP[0])


@torch.library.custom_op(f"{_LIB}::all_reduce", mutates_args=())
def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over the ranks of the tensor-parallel group (``set_tensor_parallel_group``;
    default: the whole process group), a new tensor; ``x`` itself where no group is initialised
    or it has one rank. Inserted by the tensor-parallel pass after every row-parallel linear
    (``passes/partition/tensor_parallel.py``)."""
    import torch.distributed as dist

    out = x.clone()
    if _group_size() > 1:
        start = time.perf_counter()
        dist.all_reduce(out, group=_GROUP[0])
        _COLLECTIVES[0] += time.perf_counter() - start
        _COLLECTIVES[1] += 1
    return out


_COLLECTIVES = [0.0, 0]  # seconds spent in all-reduces by this process, and their count


def collective_time() -> tuple[float, int]:
    """Seconds this process has spent in ``orca::all_reduce``'s and ``orca::all_gather``'s collectives, and how many there were
    (the runner reports each iteration's share)."""
    return _COLLECTIVES[0], _COLLECTIVES[1]


@all_reduce.register_fake
def _all_reduce_fake(x):
    return torch.empty_like(x)


ALL_REDUCE = torch.ops.orca.all_reduce.default


@torch.library.custom_op(f"{_LIB}::all_gather", mutates_args=())
def all_gather(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """The ranks' ``x`` side by side along the last dimension, in rank order: ``[..., world_size *
    x.shape[-1]]``. Inserted by the tensor-parallel pass after a vocab-parallel LM head, whose
    rank holds one block of the vocabulary's logits. ``world_size`` must be the tensor-parallel
    group's size (the fake implementation needs it to give the shape); without a group, or with
    one rank, ``world_size`` must be 1."""
    import torch.distributed as dist

    group = _group_size()
    if group != world_size:
        raise ValueError(f"orca::all_gather was compiled for {world_size} ranks, the process group has {group}")
    if world_size == 1:
        return x.clone()
    parts = [torch.empty_like(x) for _ in range(world_size)]
    start = time.perf_counter()
    dist.all_gather(parts, x.contiguous(), group=_GROUP[0])
    _COLLECTIVES[0] += time.perf_counter() - start
    _COLLECTIVES[1] += 1
    return torch.cat(parts, dim=-1)


@all_gather.register_fake
def _all_gather_fake(x, world_size):
    return x.new_empty(*x.shape[:-1], x.shape[-1] * world_size)


ALL_GATHER = torch.ops.orca.all_gather.default


@torch.library.custom_op(f"{_LIB}::expert_linear", mutates_args=())
def expert_linear(x: torch.Tensor, expert_ids: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  transposed: bool) -> torch.Tensor:
    """One linear of a mixture-of-experts layer's experts: for each token ``t`` and each of its
    ``k`` routed experts ``e = expert_ids[t, s]``, ``x[t] @ W[e]^T + b[e]`` (``x[t, s]`` when ``x``
    holds one row per pair). ``x``: ``[T, K]`` or ``[T, k, K]``; ``expert_ids``: ``[T, k]``;
    ``weight``: ``[E, N, K]``, or ``[E, K, N]`` when ``transposed`` (GPT-OSS); ``bias``: ``[E, N]``
    or None -> ``[T, k, N]``. Captured from HF's experts modules in place of their dispatch
    (``capture.py``); routing, gating and the weighted sum stay ordinary ATen ops around it.
    Tokens are grouped by expert (``kernels/experts.py``)."""
    from orca_compile.kernels import experts

    return experts.expert_linear(x, expert_ids, weight, bias, transposed)


@expert_linear.register_fake
def _expert_linear_fake(x, expert_ids, weight, bias, transposed):
    n = weight.shape[2] if transposed else weight.shape[1]
    return x.new_empty(expert_ids.shape[0], expert_ids.shape[1], n, dtype=weight.dtype)


EXPERT_LINEAR = torch.ops.orca.expert_linear.default
