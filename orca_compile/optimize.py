"""``orca_compile.optimize(model)``: a serving engine for an HF causal LM.

The face: it turns the user's options into a model source (``ModelSpec``: what to load, how to
compile it) and an ``EngineConfig``; the engine's executor builds the model from the source,
wherever it runs it. Every default is ``orca_compile.config``'s.
"""
from __future__ import annotations

import dataclasses
import logging
import os

import torch

from orca_compile.compiler import CompiledModel, ModelSpec
from orca_compile.config import DEFAULT_BACKEND, DEFAULTS, EngineConfig
from orca_compile.runtime.engine import Engine

log = logging.getLogger(__name__)
_D = DEFAULTS


def optimize(model_or_path, *, max_num_seqs: int = _D.max_num_seqs,
             max_num_batched_tokens: int = _D.max_num_batched_tokens, block_size: int = _D.block_size,
             num_kv_blocks: int | None = _D.num_kv_blocks, policy: str = _D.policy,
             policy_options: dict | None = None, tokenizer=None,
             kv_mode: str = _D.kv_mode, chunked_prefill: bool = _D.chunked_prefill,
             preemption_mode: str = _D.preemption_mode, num_host_kv_blocks: int | None = _D.num_host_kv_blocks,
             max_model_len: int | None = _D.max_model_len, backend: str = DEFAULT_BACKEND,
             executor: str = _D.executor, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
             max_in_flight: int | None = _D.max_in_flight,
             plan=None, num_devices: int | None = None, cluster=None, objective: str = "latency",
             dtype: torch.dtype | str | None = None, device: str | None = None, seed: int = 0,
             native_sixteen_bit: bool | None = None) -> Engine:
    """Turn an HF causal LM into an iteration-level serving engine (use it in a ``with`` block, or
    call ``shutdown()``, to release it).

    ``model_or_path``: an HF model object (any dtype, CPU or CUDA), a ``CompiledModel``, a preset
    name, a local checkpoint directory or a hub id (``AutoModelForCausalLM``; its tokenizer is
    loaded too when one is there). ``tokenizer``: a tokenizer object or a name/path for
    ``AutoTokenizer``. ``num_kv_blocks=None`` sizes the cache for ``max_num_seqs`` requests of
    the full context, capped at 90% of free GPU memory or 25% of available host memory.
    ``backend``: the compiler's lowering (``orca_compile.config.BACKENDS``; ``auto``: the fastest
    that applies here). ``policy`` and ``executor``: registered names
    (``runtime/policy.py``, ``runtime/executor.py``: ``fcfs``, ``priority``, ``static``, ``mlfq``),
    ``preemption_mode``: ``recompute`` (a preempted request's blocks are freed and its tokens fed
    again) or ``swap`` (its K/V copied to a host pool of ``num_host_kv_blocks`` blocks, default as
    many as the device cache, and back; a full pool falls back to recompute).
    ``policy_options`` the policy's keyword arguments (``mlfq``: ``quantum``, ``num_queues``,
    ``starvation_iterations``, ``resident_factor``). ``tensor_parallel_size`` > 1: that many
    worker processes, each with its shard of every layer (``executor="multiproc"``, chosen for you
    when ``executor`` is left at ``local``). ``pipeline_parallel_size`` > 1: that many stages,
    with up to ``max_in_flight`` iterations in flight (default: one per stage; 1: one at a time).
    ``plan="auto"``: the planner chooses tp, pp, the cuts and what to shard for ``num_devices``
    (on ``cluster``, a ``Cluster`` or a JSON path; default: this machine, measured) and
    ``objective`` (``latency`` or ``throughput``); a ``Plan`` object runs as it says. The engine's
    ``plan`` is then the plan run, with its predicted cost. ``dtype``/``device`` apply when
    loading by name. ``native_sixteen_bit``: how a bfloat16/float16 model's linears run on the CPU
    (``orca_compile/sixteen_bit.py``): True, in its 16-bit dtype on oneDNN (AMX); False, in float32
    on its 16-bit weights (the C GEMM; the numbers of HF on the weights upcast to float32); None
    (default), True where the CPU has 16-bit matrix units.
    """
    find_tokenizer = None  # the checkpoint's own, looked for once the model has loaded
    if isinstance(model_or_path, (str, os.PathLike)):
        from orca_compile.presets import preset_names

        name = os.fspath(model_or_path)
        if tokenizer is None and name not in preset_names():
            find_tokenizer = name
    elif dtype is not None or device is not None:
        raise ValueError("dtype= and device= apply when optimize() loads a model by name; move a model object "
                         "with .to() before passing it")
    elif not isinstance(model_or_path, (CompiledModel, torch.nn.Module)):
        raise ValueError(f"optimize() takes an HF model, a CompiledModel or a checkpoint path, "
                         f"got {type(model_or_path).__name__}")
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer))
    if max_model_len is not None and (isinstance(max_model_len, bool) or not isinstance(max_model_len, int)
                                      or max_model_len < 1):
        raise ValueError(f"max_model_len must be an integer >= 1 (or None: the model's), got {max_model_len!r}")
    chosen = None
    if plan is not None:
        chosen = _resolve_plan(plan, model_or_path, tensor_parallel_size, pipeline_parallel_size, num_devices, cluster,
                               objective, dtype, max_num_seqs, max_model_len)
        tensor_parallel_size, pipeline_parallel_size = chosen.tensor_parallel_size, chosen.pipeline_parallel_size
    elif num_devices is not None:
        raise ValueError("num_devices= goes with plan='auto'; for a fixed split give tensor_parallel_size= or "
                         "pipeline_parallel_size=")
    if (tensor_parallel_size != 1 or pipeline_parallel_size != 1) and executor == "local":
        executor = "multiproc"
    config = EngineConfig(num_kv_blocks=num_kv_blocks, max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=max_num_batched_tokens, block_size=block_size, policy=policy,
                          policy_options=dict(policy_options or {}), preemption_mode=preemption_mode,
                          num_host_kv_blocks=num_host_kv_blocks,
                          kv_mode=kv_mode, chunked_prefill=chunked_prefill, max_model_len=max_model_len,
                          executor=executor, max_in_flight=max_in_flight)
    source = model_spec(model_or_path, backend=backend, dtype=dtype, device=device,
                        tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size,
                        native_sixteen_bit=native_sixteen_bit)
    if chosen is not None:
        source = dataclasses.replace(source, cuts=tuple(chosen.cuts) if chosen.pipeline_parallel_size > 1 else None,
                                     replicated=tuple(map(tuple, chosen.replicated)),
                                     vocab_parallel_head=chosen.vocab_parallel_head)
    engine = Engine(source, config, tokenizer=tokenizer, seed=seed)
    engine.plan = chosen
    if find_tokenizer is not None:
        engine.tokenizer = _try_tokenizer(find_tokenizer)
    return engine


def _resolve_plan(plan, source, tp, pp, num_devices, cluster, objective, dtype, max_num_seqs, max_model_len):
    from orca_compile.passes.partition.planner import Cluster, Plan, Workload
    from orca_compile.planning import load_config, plan as make_plans

    if tp != 1 or pp != 1:
        raise ValueError("give plan= or tensor_parallel_size=/pipeline_parallel_size=, not both")
    if isinstance(plan, Plan):
        chosen = plan
    elif plan == "auto":
        if isinstance(source, CompiledModel):
            raise ValueError("plan='auto' partitions a model; a CompiledModel is one rank's graph already")
        if isinstance(cluster, (str, os.PathLike)):
            cluster = Cluster.load(cluster)
        devices = 1 if num_devices is None else num_devices
        config = load_config(source)
        context = max_model_len or getattr(config, "max_position_embeddings", 0) or 1024
        workload = Workload(batch_size=max_num_seqs, context_len=context, prefill_tokens=max(context, 1),
                            prompt_len=max(context // 2, 1))
        chosen = make_plans(source, devices, cluster=cluster, objective=objective, workload=workload, dtype=dtype)[0]
        log.info("plan auto -> %s", chosen.describe())
    else:
        raise ValueError(f"plan must be 'auto' or a Plan, got {plan!r}")
    return chosen


def model_spec(model_or_path, *, backend: str = DEFAULT_BACKEND, dtype=None, device: str | None = None,
               tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
               native_sixteen_bit: bool | None = None) -> ModelSpec:
    """The model source ``optimize()`` hands its executor (a rank of a torchrun launch that is not
    rank 0 builds the same one, and follows rank 0's engine)."""
    return ModelSpec(model_or_path, backend=backend, dtype=_dtype_name(dtype), device=device,
                     tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size,
                     native_sixteen_bit=native_sixteen_bit)


def _dtype_name(dtype) -> str | None:
    return str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else dtype


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def _try_tokenizer(name: str):
    """The checkpoint's tokenizer, or None when it ships none (token-id prompts still work).

    A local directory must hold tokenizer files: given none, ``AutoTokenizer`` would build an
    empty tokenizer from the model type and every text prompt would encode to garbage."""
    from transformers import AutoTokenizer

    if os.path.isdir(name) and not any(os.path.exists(os.path.join(name, f)) for f in TOKENIZER_FILES):
        log.warning("%s holds no tokenizer files: prompts must be token ids (or pass tokenizer=)", name)
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, TypeError) as exc:
        log.warning("no tokenizer loaded for %s (%s): prompts must be token ids (or pass tokenizer=)", name, exc)
        return None
    if len(tokenizer) == 0:
        log.warning("the tokenizer of %s is empty: prompts must be token ids (or pass tokenizer=)", name)
        return None
    return tokenizer
