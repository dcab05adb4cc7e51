"""Serving benchmarks: the engine against HF baselines on the same weights, in the same process.

Workload W1 (issue 3): a GPT-2-small-shaped model (random weights, float32), 32 requests with
prompt lengths uniform in [16, 128] and output lengths uniform in [8, 64], all arriving at once,
seed 0. Every system must produce each request's full output length (EOS is ignored), so
"useful tokens" is the same number for all: the sum of the requested output lengths. Timings
exclude one-off set-up (compiling, HF's cache allocation) and are reported separately.
"""
from __future__ import annotations

import dataclasses
import os
import random
import statistics
import time

import torch

from orca_compile.host_probes import cpu_steal_seconds, matmul_rate, read_bandwidth, settle, since
from orca_compile.presets import load_model, parse_dtype


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    model: str
    dtype: str
    num_requests: int
    prompt_len: tuple[int, int]
    output_len: tuple[int, int]
    seed: int = 0

    def requests(self, vocab_size: int) -> list[tuple[list[int], int]]:
        rng = random.Random(self.seed)
        out = []
        for _ in range(self.num_requests):
            n = rng.randint(*self.prompt_len)
            out.append(([rng.randrange(vocab_size) for _ in range(n)], rng.randint(*self.output_len)))
        return out


SYSTEMS = ("engine", "engine-onednn", "engine-eager", "engine-inductor", "hf-static", "hf-continuous")
ENGINE_VARIANTS = {"engine-onednn": "onednn", "engine-eager": "eager", "engine-inductor": "inductor"}  # the engine on another backend
WORKLOADS = {
    "w1": Workload("w1", "gpt2-small-random", "float32", 32, (16, 128), (8, 64)),
    # the same shape on the tiny default model: seconds, for smoke runs and the tests
    "w1-tiny": Workload("w1-tiny", "tiny-llama", "float32", 32, (16, 128), (8, 64)),
}


@dataclasses.dataclass
class Result:
    system: str
    seconds: float
    useful_tokens: int
    setup_seconds: float = 0.0
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.useful_tokens / self.seconds


def run_engine(model, reqs, *, max_num_seqs=32, max_num_batched_tokens=512, block_size=16, backend="auto",
               compiled=None) -> tuple[Result, list[list[int]]]:
    """Set the engine up (compile, lower, one untimed pass) and time one pass over ``reqs``."""
    return prepare_engine(model, reqs, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                          block_size=block_size, backend=backend, compiled=compiled)()


def prepare_engine(model, reqs, *, max_num_seqs=32, max_num_batched_tokens=512, block_size=16, backend="auto",
                   compiled=None):
    """The engine, set up once: compiled, lowered, and run over the whole workload untimed.
    Returns a function that times one more pass (a ``Result`` and the tokens); every call of it
    carries the same set-up seconds."""
    import orca_compile
    from orca_compile import SamplingParams

    t0 = time.perf_counter()
    compiled = compiled or orca_compile.compile(model, keep_stages=False)
    blocks = sum(-(-(len(p) + n) // block_size) for p, n in reqs) + 1
    engine = orca_compile.optimize(compiled, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                   block_size=block_size, num_kv_blocks=blocks, backend=backend)
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for _, n in reqs]
    prompts = [p for p, _ in reqs]
    # Warm-up: the whole workload once, untimed. Inductor compiles a new graph whenever a shape
    # breaks a guard of the ones it has (3 graphs on W1), and those compiles belong to set-up.
    engine.generate(prompts, params)
    setup = time.perf_counter() - t0

    def timed() -> tuple[Result, list[list[int]]]:
        engine.iteration_stats.clear()
        steal = cpu_steal_seconds()
        start = time.perf_counter()
        outs = engine.generate(prompts, params)
        seconds = time.perf_counter() - start
        steal = since(steal)
        its = list(engine.iteration_stats)
        # decode-only iterations with every request in the batch: the smallest forward, so the
        # largest share of CPU overhead
        full = [it for it in its if len(it.request_ids) >= min(max_num_seqs, len(reqs)) and not it.num_prefill_tokens]
        extra = {
            "iterations": len(its),
            "forward_share": sum(it.forward_seconds for it in its) / sum(it.seconds for it in its),
            "full_batch_iterations": len(full),
            "cpu_steal_seconds": steal,
        }
        if full:
            extra |= {
                "full_batch_iteration_ms": 1e3 * statistics.median(it.seconds for it in full),
                "full_batch_overhead_ms": 1e3 * statistics.median(it.overhead_seconds for it in full),
                "full_batch_overhead_share": statistics.median(it.overhead_seconds / it.seconds for it in full),
                "overhead_breakdown_ms": {k: 1e3 * statistics.median(getattr(it, f"{k}_seconds") for it in full)
                                          for k in ("schedule", "prepare", "sample", "update")},
            }
        extra["iteration_log"] = [dict(requests=len(it.request_ids), prefill_tokens=it.num_prefill_tokens,
                                       decode_tokens=it.num_decode_tokens, forward_ms=round(1e3 * it.forward_seconds, 2),
                                       total_ms=round(1e3 * it.seconds, 2)) for it in its]
        tokens = [o.token_ids for o in outs]
        return Result(f"orca-compile engine ({engine.backend})", seconds, sum(map(len, tokens)), setup, extra), tokens

    return timed


def run_hf_static(model, reqs, batch_size=8) -> tuple[Result, list[list[int]]]:
    """HF ``generate`` on padded batches of ``batch_size`` in arrival order, each run to the
    longest output of its batch (the static batching Orca improves on)."""
    pad = 0
    steal = cpu_steal_seconds()
    tokens, start = [], time.perf_counter()
    computed = 0
    for i in range(0, len(reqs), batch_size):
        batch = reqs[i:i + batch_size]
        longest = max(len(p) for p, _ in batch)
        ids = torch.full((len(batch), longest), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (p, _) in enumerate(batch):  # left padding: every row's last prompt token lines up
            ids[r, longest - len(p):] = torch.tensor(p)
            mask[r, longest - len(p):] = 1
        steps = max(n for _, n in batch)
        with torch.no_grad():
            out = model.generate(ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=steps,
                                 do_sample=False, eos_token_id=None, pad_token_id=pad)
        computed += len(batch) * steps
        tokens += [out[r, longest:longest + n].tolist() for r, (_, n) in enumerate(batch)]
    seconds = time.perf_counter() - start
    useful = sum(n for _, n in reqs)
    return Result(f"HF generate, static batches of {batch_size}", seconds, useful,
                  extra={"generated_incl_padding_waste": computed, "cpu_steal_seconds": since(steal)}), tokens


def run_hf_continuous(model, reqs) -> tuple[Result, list[list[int]]]:
    """HF's own continuous batching (``init_continuous_batching``), per-request ``max_new_tokens``."""
    from transformers import GenerationConfig

    gen = GenerationConfig(do_sample=False, max_new_tokens=max(n for _, n in reqs), eos_token_id=-1, pad_token_id=0)
    t0 = time.perf_counter()
    results = {}
    with model.continuous_batching_context_manager(generation_config=gen, warmup=True) as manager:
        setup = time.perf_counter() - t0
        steal = cpu_steal_seconds()
        start = time.perf_counter()
        for i, (p, n) in enumerate(reqs):
            manager.add_request(p, request_id=f"r{i}", max_new_tokens=n, eos_token_id=-1)
        while len(results) < len(reqs):
            r = manager.get_result(timeout=60)
            if r is None:
                if not manager.is_running():
                    raise RuntimeError("HF continuous batching stopped before finishing the workload")
                continue
            if r.is_finished():
                results[r.request_id] = r
        seconds = time.perf_counter() - start
        steal = since(steal)
    tokens = [list(results[f"r{i}"].generated_tokens) for i in range(len(reqs))]
    return Result("HF continuous batching", seconds, sum(map(len, tokens)), setup,
                  {"cpu_steal_seconds": steal}), tokens


def workload_flops(compiled, reqs) -> float:
    """FLOPs of the ideal run: each prompt and each generated token but the last fed once, the
    LM head only for tokens that are sampled, attention over each token's causal context."""
    from orca_compile.passes.partition.cost_model import graph_cost

    cost = graph_cost(compiled.graph_module)
    tokens = sum(len(p) + n - 1 for p, n in reqs)
    rows = sum(n for _, n in reqs)
    pairs = sum((len(p) + n - 1) * (len(p) + n) // 2 for p, n in reqs)
    return cost.flops(tokens, rows, pairs)


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of requests whose token ids agree exactly."""
    return sum(x == y for x, y in zip(a, b)) / len(a)


def _system_worker(conn, workload, system, reqs, engine_kwargs, threads):
    """A system in a process of its own (``run(isolate=True)``): loads the workload's model, sets
    the system up, then times one pass per request from the parent until it sends None."""
    if threads:
        torch.set_num_threads(threads)
    w = WORKLOADS[workload]
    model = load_model(w.model, dtype=w.dtype)
    if system == "engine" or system in ENGINE_VARIANTS:
        timed = prepare_engine(model, reqs, **engine_kwargs)
    elif system == "hf-static":
        timed = lambda: run_hf_static(model, reqs)  # noqa: E731
    else:
        timed = lambda: run_hf_continuous(model, reqs)  # noqa: E731
    conn.send("ready")
    while conn.recv() is not None:
        res, tokens = timed()
        res.extra["pid"] = os.getpid()
        conn.send((dataclasses.asdict(res), tokens))


class _Isolated:
    """The parent's handle on a ``_system_worker``: set up on creation, one timed pass per call."""

    def __init__(self, workload, system, reqs, engine_kwargs, threads):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing of the parent's state
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_system_worker, args=(child, workload, system, reqs, engine_kwargs, threads),
                                   daemon=True)
        self.process.start()
        child.close()
        if self._recv() != "ready":
            raise RuntimeError(f"the {system} worker did not start")

    def _recv(self):
        try:
            return self.conn.recv()
        except EOFError:
            raise RuntimeError(f"the benchmark worker died (exit code {self.process.exitcode})") from None

    def __call__(self):
        self.conn.send("run")
        res, tokens = self._recv()
        return Result(**res), tokens

    def close(self):
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):  # it died already
            pass
        self.process.join(timeout=60)
        if self.process.is_alive():
            self.process.terminate()


def run(workload: str = "w1", systems=("engine", "hf-static", "hf-continuous"), max_num_seqs=32,
        max_num_batched_tokens=512, backend="auto", threads: int | None = None, repeat: int = 1, settle_seconds: int = 0,
        isolate: bool = False, log=print) -> dict:
    """Time each system on the workload, in one process on one model object, and compare.

    ``repeat`` > 1 runs the systems in rounds, the order reversed every other round (ABBA), so
    that a drift of the machine over minutes lands on both sides of each comparison. Each system
    is set up once (the engine: compile, lower, one untimed pass; HF continuous batching: its own
    warm-up, every round). A system's time is its median round (the lower middle one for an even
    count); a speed-up is the median of the per-round ratios, each between runs a minute or two
    apart. ``settle_seconds`` > 0: before each system's run, wait for that many undisturbed
    seconds of CPU (``settle``; for HF continuous batching its warm-up, part of that run's call,
    comes between the wait and the timed part). ``isolate``: each system in a process of its own
    (spawned, set up once, timed on request), so that none runs under another's process-wide
    state: the engine tunes glibc's malloc for the whole process, and HF continuous batching,
    which spends more CPU in the kernel than in user code, ran under that tuning when it shared
    the engine's process (docs/benchmarks.md)."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; one of {', '.join(WORKLOADS)}")
    w = WORKLOADS[workload]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise ValueError(f"unknown system {unknown[0]!r}; one of {', '.join(SYSTEMS)}")
    if len(set(systems)) != len(systems):
        raise ValueError(f"systems lists one twice: {', '.join(systems)}")
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat must be an integer >= 1, got {repeat!r}")
    if isinstance(settle_seconds, bool) or not isinstance(settle_seconds, int) or settle_seconds < 0:
        raise ValueError(f"settle_seconds must be an integer >= 0, got {settle_seconds!r}")
    if threads:
        torch.set_num_threads(threads)
    import orca_compile

    model = load_model(w.model, dtype=w.dtype)
    compiled = orca_compile.compile(model, keep_stages=False)
    reqs = w.requests(compiled.vocab_size)
    rate = matmul_rate(parse_dtype(w.dtype))
    flops = workload_flops(compiled, reqs)
    floor = flops / rate
    log(f"workload {w.name}: {w.model} {w.dtype}, {len(reqs)} requests, prompts {sum(len(p) for p, _ in reqs)} "
        f"tokens, outputs {sum(n for _, n in reqs)} tokens; torch threads {torch.get_num_threads()}")
    log(f"compute floor: {flops / 1e9:.1f} GFLOP / {rate / 1e9:.1f} GFLOP/s measured matmul rate = {floor:.2f} s")

    prepared = {}

    def prepare(system):
        kwargs = dict(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                      backend=ENGINE_VARIANTS.get(system, backend))
        if isolate:
            prepared[system] = _Isolated(workload, system, reqs, kwargs, threads)
        else:
            prepared[system] = prepare_engine(model, reqs, compiled=compiled, **kwargs)

    def once(system):
        if system not in prepared and (isolate or system == "engine" or system in ENGINE_VARIANTS):
            prepare(system)
        if system in prepared:
            return prepared[system]()
        if system == "hf-static":
            return run_hf_static(model, reqs)
        return run_hf_continuous(model, reqs)

    bandwidth = [read_bandwidth()]
    rounds = {system: [] for system in systems}
    tokens = {}
    try:
        for r in range(repeat):
            if repeat > 1:
                log(f"round {r + 1} of {repeat}")
            for system in (systems if r % 2 == 0 else systems[::-1]):
                if (isolate or system in ("engine", *ENGINE_VARIANTS)) and system not in prepared:
                    prepare(system)  # set-up before settling: the timed run follows the settle directly
                settled = settle(settle_seconds) if settle_seconds else None
                res, toks = once(system)
                if settled is not None:
                    res.extra["settle_seconds"], res.extra["cpu_stolen_while_settling"] = settled
                if system in tokens and toks != tokens[system]:
                    raise RuntimeError(f"{res.system} gave other tokens in round {r + 1} than in round 1")
                tokens[system] = toks
                rounds[system].append(res)
                steal = res.extra.get("cpu_steal_seconds")
                log(f"  {res.system:38} {res.seconds:8.2f} s {res.tokens_per_second:9.1f} tok/s "
                    f"(set-up {res.setup_seconds:.1f} s" + ("" if steal is None else f"; CPU stolen {steal:.2f} s")
                    + (f"; settled {settled[0]:.0f} s first" if settled else "") + ")")
    finally:  # the workers go with the run, whether it finished or raised
        for worker in prepared.values():
            if isinstance(worker, _Isolated):
                worker.close()
    bandwidth.append(read_bandwidth())
    log(f"DRAM read rate (sum over 512 MB): {bandwidth[0] / 1e9:.1f} GB/s before the systems ran, "
        f"{bandwidth[1] / 1e9:.1f} GB/s after")
    # each system's median round stands for it; the per-round times go in the report too
    results = [sorted(rounds[s], key=lambda res: res.seconds)[(repeat - 1) // 2] for s in systems]
    report = {"workload": dataclasses.asdict(w), "flops": flops, "matmul_rate": rate, "compute_floor_s": floor,
              "read_bandwidth_before": bandwidth[0], "read_bandwidth_after": bandwidth[1],
              "threads": torch.get_num_threads(), "repeat": repeat, "isolated": isolate,
              "results": [dataclasses.asdict(res) | {"tokens_per_second": res.tokens_per_second,
                                                     "rounds_seconds": [x.seconds for x in rounds[s]]}
                          for s, res in zip(systems, results)]}
    if "engine" in tokens:
        eng = results[list(systems).index("engine")]
        engine_rounds = [x.seconds for x in rounds["engine"]]
        report["engine_over_floor"] = eng.seconds / floor
        log(f"engine time / compute floor: {report['engine_over_floor']:.2f}x")
        for other, res in zip(systems, results):
            if other == "engine":
                continue
            ratios = [o.seconds / e for o, e in zip(rounds[other], engine_rounds)]
            ratio = statistics.median(ratios)
            spread = f" (rounds: {', '.join(f'{x:.2f}' for x in ratios)})" if repeat > 1 else ""
            same = agreement(tokens["engine"], tokens[other])
            if other in ENGINE_VARIANTS:
                report[f"engine_over_{other}"] = ratio
                log(f"engine ({eng.system}) is {ratio:.2f}x {res.system}'s speed{spread}; same tokens for "
                    f"{same:.0%} of requests")
                continue
            report[f"speedup_over_{other}"] = ratio
            if repeat > 1:
                report[f"speedup_over_{other}_rounds"] = ratios
            log(f"engine speed-up over {res.system}: {ratio:.2f}x{spread}; same tokens for {same:.0%} of requests")
        if "full_batch_overhead_share" in eng.extra:
            x = eng.extra
            log(f"engine iterations: {x['iterations']}; decode-only with all {min(max_num_seqs, len(reqs))} requests in the batch: median {x['full_batch_iteration_ms']:.1f} ms, "
                f"CPU overhead {x['full_batch_overhead_ms']:.2f} ms = {x['full_batch_overhead_share']:.1%} "
                f"({', '.join(f'{k} {v:.2f}' for k, v in x['overhead_breakdown_ms'].items())} ms)")
    return report
