"""``run()``: time each system on a workload in rounds and compare. The workloads are in
``workloads.py``, the systems in ``systems.py``, the process isolation in ``isolation.py``, the
statistics in ``stats.py``, the report and its lines in ``report.py``."""
from __future__ import annotations

import dataclasses

import torch

from orca_compile import env
from orca_compile.bench import report as reporting
from orca_compile.bench import systems as systems_mod
from orca_compile.bench.isolation import Isolated
from orca_compile.bench.workloads import workload as get_workload
from orca_compile.host_probes import matmul_rate, read_bandwidth, settle
from orca_compile.presets import load_model, parse_dtype


def run(workload: str = "w1", systems=("engine", "hf-static", "hf-continuous"), max_num_seqs=None,
        max_num_batched_tokens=None, backend="auto", threads: int | None = None, repeat: int = 1,
        settle_seconds: int = 0, isolate: bool = False, tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1, device=None, dtype: str | None = None, log=print) -> dict:
    """Time each system on the workload and compare.

    ``repeat`` > 1 runs the systems in rounds, the order reversed every other round (ABBA), so
    that a drift of the machine over minutes lands on both sides of each comparison. Each system
    is set up once (the engine: compile, lower, one untimed pass; HF continuous batching: its own
    warm-up, every round). A system's time is its median round; a speed-up is the median of the
    per-round ratios (``stats.py``). ``settle_seconds`` > 0: before each system's run, wait for that
    many undisturbed seconds of CPU (``settle``; for HF continuous batching its warm-up, part of
    that run's call, comes between the wait and the timed part). ``isolate``: each system in a
    process of its own (``isolation.py``); otherwise all run in this process on one model object.
    ``max_num_seqs`` / ``max_num_batched_tokens`` None: the workload's. ``tensor_parallel_size``
    and ``pipeline_parallel_size`` apply to the ``engine`` system (a process per rank).
    ``device``: where every system runs (None: the CPU; ``cuda``: the GPU, each system on the same
    one); ``dtype``: the workload's model in another dtype (e.g. W1 in bfloat16 on a GPU)."""
    w = get_workload(workload)
    if dtype is not None:
        parse_dtype(dtype)  # a bad name fails here, before anything loads
        w = dataclasses.replace(w, dtype=dtype)
    on = torch.device(device or "cpu")
    unknown = [s for s in systems if s not in systems_mod.SYSTEMS]
    if unknown:
        raise ValueError(f"unknown system {unknown[0]!r}; one of {', '.join(systems_mod.SYSTEMS)}")
    if len(set(systems)) != len(systems):
        raise ValueError(f"systems lists one twice: {', '.join(systems)}")
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat must be an integer >= 1, got {repeat!r}")
    if isinstance(settle_seconds, bool) or not isinstance(settle_seconds, int) or settle_seconds < 0:
        raise ValueError(f"settle_seconds must be an integer >= 0, got {settle_seconds!r}")
    max_num_seqs = max_num_seqs or w.max_num_seqs
    max_num_batched_tokens = max_num_batched_tokens or w.max_num_batched_tokens
    if threads:
        torch.set_num_threads(threads)
    import orca_compile
    from orca_compile import sixteen_bit

    model = load_model(w.source(), dtype=w.dtype, device=device)
    compiled = orca_compile.compile(model, keep_stages=False)
    reqs = w.requests(compiled.vocab_size)
    # the rate of the engine's arithmetic: for a 16-bit checkpoint on the CPU, its linears' (16-bit
    # where the CPU has 16-bit matrix units, else float32: orca_compile/sixteen_bit.py); the
    # checkpoint's own dtype on a GPU
    arithmetic = w.dtype or w.checkpoint_dtype or "float32"
    if w.dtype is None and w.checkpoint_dtype is not None and on.type == "cpu":
        native = sixteen_bit.matmul_dtype(parse_dtype(w.checkpoint_dtype), None)
        arithmetic = str(native or torch.float32).removeprefix("torch.")
    rate = matmul_rate(parse_dtype(arithmetic), device=on)
    flops = workload_flops(compiled, reqs)
    floor = flops / rate
    log(f"workload {w.name}: {w.model} {w.dtype or w.checkpoint_dtype + ' checkpoint'}, {len(reqs)} requests, prompts {sum(len(p) for p, _ in reqs)} "
        f"tokens, outputs {sum(n for _, n in reqs)} tokens; torch threads {torch.get_num_threads()}"
        + ("" if on.type == "cpu" else f"; on {_device_name(on)}")
        + (f"; oneDNN capped by {isa}" if (isa := env.get().onednn_max_cpu_isa) and on.type == "cpu" else ""))
    log(f"compute floor: {flops / 1e9:.1f} GFLOP / {rate / 1e9:.1f} GFLOP/s measured matmul rate = {floor:.2f} s")

    prepared = {}

    def prepare(system):
        kwargs = dict(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, backend=backend)
        if system == "engine" and (tensor_parallel_size > 1 or pipeline_parallel_size > 1):
            kwargs |= dict(tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size)
        if isolate:
            prepared[system] = Isolated(workload if dtype is None else w, system, reqs, kwargs, threads, device)
        else:
            # the workload's graph was compiled for eager (its FLOPs, its vocabulary); a 16-bit model
            # on the CPU is the engine's to compile itself (widened: orca_compile/sixteen_bit.py)
            own = compiled if sixteen_bit.cpu_weights(model) is None else None
            prepared[system] = systems_mod.prepare(system, model, reqs, kwargs, compiled=own, workload=w,
                                                   device=device)

    bandwidth = [read_bandwidth(device=on)]
    rounds = {system: [] for system in systems}
    tokens = {}
    try:
        for r in range(repeat):
            if repeat > 1:
                log(f"round {r + 1} of {repeat}")
            for system in (systems if r % 2 == 0 else systems[::-1]):
                if system not in prepared:
                    prepare(system)  # set-up before settling: the timed run follows the settle directly
                settled = settle(settle_seconds) if settle_seconds else None
                res, toks = prepared[system]()
                if settled is not None:
                    res.extra["settle_seconds"], res.extra["cpu_stolen_while_settling"] = settled
                if system in tokens and toks != tokens[system]:
                    raise RuntimeError(f"{res.system} gave other tokens in round {r + 1} than in round 1")
                tokens[system] = toks
                rounds[system].append(res)
                log(reporting.run_line(res, settled))
    finally:  # the workers go with the run, whether it finished or raised
        for worker in prepared.values():
            if isinstance(worker, Isolated):
                worker.close()
            elif hasattr(worker, "shutdown"):
                worker.shutdown()
    bandwidth.append(read_bandwidth(device=on))
    log(f"{'DRAM' if on.type == 'cpu' else 'device memory'} read rate (sum over 512 MB): {bandwidth[0] / 1e9:.1f} "
        f"GB/s before the systems ran, {bandwidth[1] / 1e9:.1f} GB/s after")
    report = reporting.build(w, systems, rounds, tokens, flops=flops, rate=rate, floor=floor, bandwidth=bandwidth,
                             threads=torch.get_num_threads(), repeat=repeat, isolate=isolate,
                             max_num_seqs=max_num_seqs, log=log)
    if on.type != "cpu":
        report["device"] = _device_name(on)
    elif env.get().onednn_max_cpu_isa:  # a run that models a CPU without some of this one's instructions
        report["onednn_max_cpu_isa"] = env.get().onednn_max_cpu_isa
    return report


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)


def workload_flops(compiled, reqs) -> float:
    """FLOPs of the ideal run: each prompt and each generated token but the last fed once, the
    LM head only for tokens that are sampled, attention over each token's causal context."""
    from orca_compile.passes.partition.cost_model import graph_cost

    cost = graph_cost(compiled.graph_module)
    tokens = sum(len(p) + n - 1 for p, n in reqs)
    rows = sum(n for _, n in reqs)
    pairs = sum((len(p) + n - 1) * (len(p) + n) // 2 for p, n in reqs)
    return cost.flops(tokens, rows, pairs)


