"""What the machine is doing while a benchmark runs: its matmul rate and DRAM read rate, the CPU
time the hypervisor takes from it, and a wait until it leaves the CPUs alone. The serving
harness (``bench/``) measures these beside the systems it times; on a shared VM they move by
more than most changes do (docs/benchmarks.md)."""
from __future__ import annotations

import os
import time

import torch


def cpu_steal_seconds() -> float | None:
    """CPU time the hypervisor gave other guests while this one wanted it, summed over the CPUs
    since boot (Linux's /proc/stat), or None where there is no such count. Each system's run
    records its share: on a shared VM, time stolen during a run slows it (docs/benchmarks.md)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")  # cpu user nice system idle iowait irq softirq steal
    except (OSError, IndexError, ValueError):
        return None


def settle(clean_seconds: int, max_seconds: float = 120.0) -> tuple[float, float] | None:
    """Wait until the host runs this machine's CPUs undisturbed: ``clean_seconds`` one-second
    probes in a row (a matmul loop on torch's threads) with under 1% of their CPU time stolen.
    Returns (seconds waited, CPU seconds stolen meanwhile), or None without a steal count.

    Why: on the dev machine, a shared VM, the ~20 s after a run of HF continuous batching lose
    10-15% of the CPU to the host in bursts (steal; none during HF's own run, none after the
    engine's), so whichever system runs next is timed on a slower machine. Settling before every
    timed run measures each system on the same undisturbed machine (docs/benchmarks.md)."""
    if cpu_steal_seconds() is None:
        return None
    a, b = torch.randn(256, 768), torch.randn(768, 768)
    limit = 0.01 * torch.get_num_threads() + 0.005  # 1% of the probe's CPU time, steal counts in 10 ms
    start, clean, stolen = time.perf_counter(), 0, 0.0
    while clean < clean_seconds and time.perf_counter() - start < max_seconds:
        before, t0 = cpu_steal_seconds(), time.perf_counter()
        while time.perf_counter() - t0 < 1.0:
            torch.mm(a, b)
        lost = cpu_steal_seconds() - before
        stolen += lost
        clean = clean + 1 if lost <= limit else 0
    return time.perf_counter() - start, stolen


def since(start: float | None) -> float | None:
    now = cpu_steal_seconds()
    return None if start is None or now is None else now - start


def _sync(device) -> None:
    """Wait for the device's queued work: CUDA calls return before the GPU has run them, so a host
    clock around them times the launches, not the work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(dtype: torch.dtype, device="cpu") -> float:
    """This machine's best measured dense matmul rate (FLOP/s) over GPT-2-small-like shapes."""
    best = 0.0
    for m, k, n in ((512, 768, 3072), (512, 3072, 768), (1024, 768, 2304), (256, 768, 50257)):
        a = torch.randn(m, k, dtype=dtype, device=device)
        b = torch.randn(k, n, dtype=dtype, device=device)
        torch.mm(a, b)
        _sync(device)
        reps = 0
        start = time.perf_counter()
        while reps < 3 or time.perf_counter() - start < 0.5:
            torch.mm(a, b)
            reps += 1
            if reps % 8 == 0:  # a GPU queues launches far ahead of the work; the clock must see the work
                _sync(device)
        _sync(device)
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - start))
    return best


def read_bandwidth(nbytes: int = 512 << 20, device="cpu") -> float:
    """This machine's memory read rate now (bytes/s): the best of 3 ``sum`` passes over ``nbytes`` of
    float32, far past any cache (on a GPU: of its memory). Measured before and after the systems:
    on a shared host it moves with the neighbours' load (30-52 GB/s within a minute on the dev
    machine), and the engine's decode steps (weights and K/V streamed) move with it."""
    x = torch.ones(nbytes // 4, device=device)
    # a GPU reads 512 MB in ~0.1 ms: ten passes a window (after a warm-up), so the clock's and the
    # launch's microseconds stay small beside it
    reps = 10 if x.is_cuda else 1
    if x.is_cuda:
        x.sum()
        _sync(device)
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(reps):
            x.sum()
        _sync(device)
        best = max(best, reps * nbytes / (time.perf_counter() - start))
    return best


def _all_reduce_probe(rank, world_size, port, sizes, reps, out):
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    # not join_process_group: this probe never imports torch._dynamo after the group (nothing to
    # leak), and that import would cost each probe process a second
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    times = []
    for n in sizes:
        x = torch.ones(n // 4)
        dist.all_reduce(x)  # warm the connection
        start = time.perf_counter()
        for _ in range(reps):
            dist.all_reduce(x)
        times.append((time.perf_counter() - start) / reps)
    if rank == 0:
        out.put(times)
    dist.destroy_process_group()


def all_reduce_link(world_size: int = 2, small: int = 4 << 10, large: int = 4 << 20, reps: int = 20,
                    timeout: float = 120.0) -> tuple[float, float]:
    """(bus bytes/s, seconds per step) of a gloo all-reduce among ``world_size`` processes on this
    machine, fitted to the ring model the cost model uses (``2 (p - 1)`` steps of ``bytes / p``):
    from the time of a small all-reduce (latency-bound) and a large one (bandwidth-bound)."""
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_all_reduce_probe, args=(r, world_size, port, (small, large), reps, out), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    try:
        t_small, t_large = out.get(timeout=timeout)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    steps = 2 * (world_size - 1)
    latency = t_small / steps
    bandwidth = (2 * (world_size - 1) / world_size) * large / max(t_large - steps * latency, 1e-9)
    return bandwidth, latency


def op_overhead(reps: int = 2000) -> float:
    """Seconds one small ATen op costs from Python here (dispatch, allocation): the launch price
    the cost model charges each op of a graph."""
    x = torch.ones(8)
    start = time.perf_counter()
    for _ in range(reps):
        x = x + 1.0
    return (time.perf_counter() - start) / reps


def gemm_rates(dtype: torch.dtype = torch.float32, nbytes: int = 512 << 20) -> tuple[float, float]:
    """(FLOP/s, weight bytes/s) of the ``cpu`` backend's own C GEMM here: the rate of a 512-row
    product (prefill-shaped, compute-bound) and of one row against ``nbytes`` of packed weights,
    more than any cache holds (decode-shaped: the weight stream). These, not ``torch.mm``'s, are
    the rates the lowered graph runs at."""
    from orca_compile.kernels import gemm_cpu

    w = gemm_cpu.pack(torch.randn(3072, 768, dtype=dtype))
    x = torch.randn(512, 768, dtype=dtype)
    gemm_cpu.linear(x, w, None, 3072, 0)
    flops = 0.0
    for _ in range(3):  # the best of three windows: a neighbour's burst on a shared host halves one
        reps, start = 0, time.perf_counter()
        while reps < 3 or time.perf_counter() - start < 0.3:
            gemm_cpu.linear(x, w, None, 3072, 0)
            reps += 1
        flops = max(flops, 2 * 512 * 768 * 3072 * reps / (time.perf_counter() - start))
    each = 3072 * 768 * torch.empty((), dtype=dtype).element_size()
    weights = [gemm_cpu.pack(torch.randn(3072, 768, dtype=dtype)) for _ in range(max(1, nbytes // each))]
    row = torch.randn(1, 768, dtype=dtype)
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        for wi in weights:
            gemm_cpu.linear(row, wi, None, 3072, 0)
        best = max(best, len(weights) * each / (time.perf_counter() - start))
    return flops, best


def measure_machine(dtype: torch.dtype = torch.float32, world_size: int = 1, backend: str = "cpu"):
    """This machine as the cost model sees it (``passes/partition/cost_model.Machine``), each rank
    with ``cpu_count / world_size`` threads (as the multiproc executor runs them). ``backend="cpu"``
    (where the C GEMM builds): the rates of the kernels the lowered graph runs (``gemm_rates``);
    otherwise ``torch.mm``'s rate and a ``sum``'s read rate."""
    from orca_compile.kernels import gemm_cpu
    from orca_compile.passes.partition.cost_model import Machine

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        if backend == "cpu" and gemm_cpu.available():
            rate, bandwidth = gemm_rates(dtype)
        else:
            rate, bandwidth = matmul_rate(dtype), read_bandwidth()
        overhead = op_overhead()
    finally:
        torch.set_num_threads(threads)
    link, latency = all_reduce_link(world_size) if world_size > 1 else (0.0, 0.0)
    return Machine(rate, bandwidth, link, latency, overhead)
