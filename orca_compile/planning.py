"""Planning from a config alone: the model built on meta tensors (no weights), captured and
rewritten like any other, then priced and partitioned by ``passes/partition/planner.py``.

A ``MODEL`` here is a preset name, a ``config.json`` (or a directory holding one, weights or
not), a hub id, a ``PretrainedConfig`` or an HF model object. A model whose layers repeat a
pattern (every layer alike; Gemma-2's sliding and full layers alternating) is captured one period
deep: a 70B-parameter Llama plans in seconds, and its per-layer costs are those of the full graph
(``tests/passes/test_planner.py`` compares the two on a small model).
"""
from __future__ import annotations

import copy
import logging
import os

import torch

from orca_compile.passes.partition.planner import (Cluster, ModelProfile, Plan, Planner, Workload, profile,
                                                   rank_plans)

log = logging.getLogger(__name__)

# config attributes that make layers differ in ways ``layer_types`` does not say: capture all layers
_IRREGULAR = ("first_k_dense_replace", "mlp_only_layers", "decoder_sparse_step", "moe_layer_freq",
              "no_rope_layers", "layers_block_type")


def load_config(source):
    """A ``PretrainedConfig`` from a preset name, a config file or directory, a hub id, a config
    or a model."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source
    if isinstance(source, torch.nn.Module):
        return source.config
    if isinstance(source, (str, os.PathLike)):
        from orca_compile.presets import preset_config, preset_names

        name = os.fspath(source)
        if name in preset_names():
            return preset_config(name)
        if os.path.isfile(name) or os.path.isdir(name):
            try:
                return AutoConfig.from_pretrained(name)
            except (OSError, ValueError, KeyError) as exc:
                raise ValueError(f"cannot read a model config from {name!r}: {' '.join(str(exc).split())}") from None
        try:
            return AutoConfig.from_pretrained(name)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{name!r} is no preset, config file, directory or reachable hub id: "
                             f"{' '.join(str(exc).split())}") from None
    raise ValueError(f"a model to plan is a preset, a config path, a hub id or a config, got {type(source).__name__}")


def _num_layers(config) -> int:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    raise ValueError(f"{type(config).__name__} names no layer count (num_hidden_layers)")


def probe_config(config, exact_depth: bool = False):
    """(a config one period deep, the probe layer of each real layer). The period is the shortest
    repeat of ``layer_types`` (1 where the config has none); ``exact_depth`` or a config whose
    layers differ otherwise keeps every layer."""
    layers = _num_layers(config)
    types = getattr(config, "layer_types", None)
    irregular = [k for k in _IRREGULAR if getattr(config, k, None) not in (None, 0, [], 1)]
    if exact_depth or irregular:
        if irregular and not exact_depth:
            log.info("planning %s at full depth: its layers differ (%s)", type(config).__name__, ", ".join(irregular))
        return config, list(range(layers))
    period = 1
    if types:
        period = next(p for p in range(1, layers + 1) if all(types[i] == types[i % p] for i in range(layers)))
    probe = copy.deepcopy(config)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(probe, key, None), int):
            setattr(probe, key, period)
    if types:
        probe.layer_types = list(types[:period])
    return probe, [i % period for i in range(layers)]


def config_dtype(config, dtype=None) -> torch.dtype:
    from orca_compile.presets import parse_dtype

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype:
        return parse_dtype(dtype)
    found = getattr(config, "dtype", None)
    if isinstance(found, str):
        found = getattr(torch, found, None)
    return found if isinstance(found, torch.dtype) else torch.float32


def model_profile(source, dtype=None, max_tensor_parallel: int = 8, exact_depth: bool = False) -> ModelProfile:
    """The planner's view of ``source``: its graph captured on meta tensors, rewritten into
    selective-batching form and priced at every tensor-parallel degree up to
    ``max_tensor_parallel``."""
    from transformers import AutoModelForCausalLM

    from orca_compile.capture import capture
    from orca_compile.passes.manager import DEFAULT_PIPELINE, PassManager

    config = load_config(source)
    probe, classes = probe_config(config, exact_depth)
    dtype = config_dtype(config, dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(probe, dtype=dtype).eval()
    final = PassManager(DEFAULT_PIPELINE, keep_stages=False).run(capture(model))
    final.meta["orca"].module_paths = {}
    name = getattr(config, "_name_or_path", "") or type(config).__name__
    return profile(final, num_layers=len(classes), layer_class=classes, max_tensor_parallel=max_tensor_parallel,
                   name=name)


def local_cluster(world_size: int, dtype: torch.dtype = torch.float32, backend: str = "cpu") -> Cluster:
    """This machine as ``world_size`` processes, each with ``cpu_count / world_size`` threads and
    an equal share of the available memory, its rates measured now (``host_probes``)."""
    from orca_compile.host_probes import measure_machine
    from orca_compile.runtime.kv_cache import host_available_bytes

    machine = measure_machine(dtype, world_size, backend)
    return Cluster.from_machine(machine, world_size, host_available_bytes() / world_size,
                                name=f"this machine, {world_size} process{'es' if world_size > 1 else ''}")


def plan(source, devices: int, cluster: Cluster | None = None, objective: str = "latency",
         workload: Workload | None = None, iteration: str = "decode", latency_bound: float | None = None,
         dtype=None, model: ModelProfile | None = None) -> list[Plan]:
    """Every (tp, pp) plan for ``source`` on ``devices`` devices, best first. ``cluster=None``:
    this machine, measured once per process count (a plan on fewer processes gives each more
    threads). Raises ``ValueError`` when nothing fits."""
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(f"devices must be an integer >= 1, got {devices!r}")
    workload = workload or Workload()
    model = model or model_profile(source, dtype=dtype, max_tensor_parallel=devices)
    options = dict(workload=workload, objective=objective, iteration=iteration, latency_bound=latency_bound)
    if cluster is not None:
        plans = Planner(model, cluster, **options).plans(devices)
        where = f"{devices} devices of {cluster.name or 'the cluster'}"
    else:
        plans = []
        for world in range(1, devices + 1):
            here = local_cluster(world)
            plans += [p for p in Planner(model, here, **options).plans(world) if p.num_devices == world]
        plans = rank_plans(plans, iteration, latency_bound)
        where = f"{devices} processes here"
    if not plans:
        raise ValueError(f"no plan fits {where}: the weights and the KV cache of {workload.batch_size} requests of "
                         f"{workload.context_len} tokens exceed the memory; add devices or shrink the workload")
    return plans
