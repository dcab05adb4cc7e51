"""Serving benchmarks: the engine against HF baselines on the same weights, in the same run.

Split by concern: ``workloads`` (which model, which requests), ``systems`` (the engine on each
backend, HF static and continuous batching, each set up once and timed per call), ``isolation``
(each system in a process of its own), ``stats`` (median rounds, per-round ratios), ``report``
(the JSON report and the printed lines), ``harness`` (``run()``: rounds in ABBA order);
``online``: Poisson arrivals served under each scheduling policy (Orca's and FastServe's experiments)."""
from orca_compile.bench import online
from orca_compile.bench.harness import run, workload_flops
from orca_compile.bench.stats import agreement
from orca_compile.bench.systems import (ENGINE_VARIANTS, SYSTEMS, Result, prepare_engine, run_engine,
                                        run_hf_continuous, run_hf_static)
from orca_compile.bench.workloads import WORKLOADS, Workload
from orca_compile.presets import load_model

__all__ = ["online", "run", "workload_flops", "agreement", "ENGINE_VARIANTS", "SYSTEMS", "Result", "prepare_engine",
           "run_engine", "run_hf_continuous", "run_hf_static", "WORKLOADS", "Workload", "load_model"]
