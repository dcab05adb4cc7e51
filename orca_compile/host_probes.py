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


def matmul_rate(dtype: torch.dtype, device="cpu") -> float:
    """This machine's best measured dense matmul rate (FLOP/s) over GPT-2-small-like shapes."""
    best = 0.0
    for m, k, n in ((512, 768, 3072), (512, 3072, 768), (1024, 768, 2304), (256, 768, 50257)):
        a = torch.randn(m, k, dtype=dtype, device=device)
        b = torch.randn(k, n, dtype=dtype, device=device)
        torch.mm(a, b)
        reps = 0
        start = time.perf_counter()
        while reps < 3 or time.perf_counter() - start < 0.5:
            torch.mm(a, b)
            reps += 1
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - start))
    return best


def read_bandwidth(nbytes: int = 512 << 20) -> float:
    """This machine's DRAM read rate now (bytes/s): the best of 3 ``sum`` passes over ``nbytes`` of
    float32, far past any cache. Measured before and after the systems: on a shared host it moves
    with the neighbours' load (30-52 GB/s within a minute on the dev machine), and the engine's
    decode steps (weights and K/V streamed) move with it."""
    x = torch.ones(nbytes // 4)
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        x.sum()
        best = max(best, nbytes / (time.perf_counter() - start))
    return best
