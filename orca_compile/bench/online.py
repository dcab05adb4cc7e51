"""Online serving under each scheduling policy (issue 17): requests arrive as a Poisson process and
the engine serves them as they come, one iteration at a time.

Two experiments, each a set of requests replayed at several arrival rates under several policies:

* ``orca`` (Orca's evaluation, section 6): input and output lengths uniform, as in the paper
  (inputs 32-512 tokens, outputs 1-128) scaled down 4x for this CPU; ``static`` (request-level
  batching, Orca's baseline), ``fcfs`` (Orca) and ``mlfq`` (FastServe). Curves of throughput
  against median normalized latency (seconds per generated token), and mean and tail job
  completion time (JCT).
* ``fastserve``: the same inputs, outputs from a heavy-tailed (bounded Pareto) distribution, so a
  few long jobs hold the batch that short ones wait for: ``fcfs`` against ``mlfq``, mean and tail JCT.

*The clock.* Each experiment point runs on a simulated clock driven by measured time: every pass
of the serving loop (admitting the requests that have arrived, one ``engine.step()``) advances it
by the wall time that pass took; when the engine is idle the clock jumps to the next arrival
instead of sleeping. With a quiet machine that is what a real-time run would measure, without the
idle waits. Arrivals are drawn once per experiment as unit-rate gaps and divided by the rate, so
every rate and every policy sees the same requests in the same order. At each rate the policies
run back to back, in an order rotated from rate to rate, so that a drift of the machine over the
run (a shared 2-core VM moved single points by 30%) lands on all of them alike.
"""
from __future__ import annotations

import dataclasses
import math
import random
import statistics
import time

from orca_compile.config import DEFAULTS

# Orca's baseline, Orca, FastServe's skip-join MLFQ (its defaults, runtime/policy.py)
ONLINE_POLICIES = ("static", "fcfs", "mlfq")


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    model: str
    dtype: str
    num_requests: int
    prompt_len: tuple[int, int]  # uniform, inclusive
    # ("uniform", lo, hi) or ("pareto", alpha, lo, hi): a bounded Pareto, rounded down
    output_len: tuple
    rates: tuple[float, ...]  # requests per second, the points of each curve
    policies: tuple[str, ...]
    max_num_seqs: int = 32
    max_num_batched_tokens: int = DEFAULTS.max_num_batched_tokens
    seed: int = 0

    def lengths(self) -> list[tuple[int, int]]:
        """``(prompt length, output length)`` per request, the same at every rate."""
        rng = random.Random(self.seed)
        kind, *args = self.output_len
        out = []
        for _ in range(self.num_requests):
            n = rng.randint(*self.prompt_len)
            if kind == "uniform":
                g = rng.randint(*args)
            elif kind == "pareto":
                g = bounded_pareto(rng.random(), *args)
            else:
                raise ValueError(f"unknown output length distribution {kind!r}")
            out.append((n, g))
        return out

    def trace(self, vocab_size: int, rate: float) -> list[tuple[float, list[int], int]]:
        """``(arrival seconds, prompt ids, output length)`` per request at ``rate`` requests/s."""
        if not rate > 0:
            raise ValueError(f"rate must be > 0 requests per second, got {rate!r}")
        rng = random.Random(self.seed + 1)
        t, out = 0.0, []
        for n, g in self.lengths():
            t += rng.expovariate(1.0)
            out.append((t / rate, [rng.randrange(vocab_size) for _ in range(n)], g))
        return out


def bounded_pareto(u: float, alpha: float, lo: int, hi: int) -> int:
    """The inverse CDF of a Pareto(``alpha``) bounded to [lo, hi] at ``u`` in [0, 1), rounded down:
    most draws near ``lo``, a heavy tail up to ``hi``."""
    ratio = (lo / hi) ** alpha
    x = lo / (1 - u * (1 - ratio)) ** (1 / alpha)
    return min(hi, max(lo, int(x)))


EXPERIMENTS = {
    # Orca's lengths (inputs U(32, 512), outputs U(1, 128)) / 4 on W1's model
    "orca": Experiment("orca", "gpt2-small-random", "float32", 120, (8, 128), ("uniform", 1, 32),
                       rates=(1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0), policies=ONLINE_POLICIES),
    # the same inputs; outputs heavy-tailed: median 7 tokens, mean 16, one in twenty over 64; a
    # batch of 8, so that the long jobs hold places short ones wait for (FastServe's setting: a
    # batch bounded by the GPU's memory)
    "fastserve": Experiment("fastserve", "gpt2-small-random", "float32", 160, (8, 128), ("pareto", 1.0, 4, 256),
                            rates=(3.0, 4.0, 5.0), policies=("fcfs", "mlfq"), max_num_seqs=8),
    # the tiny default model, a few requests: seconds, for smoke runs and the tests
    "orca-tiny": Experiment("orca-tiny", "tiny-llama", "float32", 24, (4, 32), ("uniform", 1, 12),
                            rates=(100.0, 2000.0), policies=ONLINE_POLICIES, max_num_seqs=4),
    "fastserve-tiny": Experiment("fastserve-tiny", "tiny-llama", "float32", 24, (4, 32), ("pareto", 1.0, 2, 48),
                                 rates=(2000.0,), policies=("fcfs", "mlfq"), max_num_seqs=4),
}
# what `orca-compile bench NAME` runs
SUITES = {"orca": ("orca", "fastserve"), "orca-tiny": ("orca-tiny", "fastserve-tiny")}


@dataclasses.dataclass
class Point:
    """One policy at one arrival rate: what each request saw, and the summary figures."""
    policy: str
    rate: float
    arrivals: list[float]
    first_token: list[float]  # when each request got its first token (simulated seconds)
    finish: list[float]
    output_len: list[int]
    iterations: int
    busy_seconds: float  # the sum of the loop passes' times (the clock, idle jumps excluded)

    @property
    def jct(self) -> list[float]:
        return [f - a for f, a in zip(self.finish, self.arrivals)]

    def summary(self) -> dict:
        jct = self.jct
        norm = [j / g for j, g in zip(jct, self.output_len)]
        ttft = [t - a for t, a in zip(self.first_token, self.arrivals)]
        span = max(self.finish) - min(self.arrivals)
        return {"policy": self.policy, "rate": self.rate, "throughput": len(jct) / span,
                "median_normalized_latency": statistics.median(norm),
                "mean_jct": statistics.fmean(jct), "p50_jct": percentile(jct, 50), "p95_jct": percentile(jct, 95),
                "p99_jct": percentile(jct, 99), "mean_ttft": statistics.fmean(ttft),
                "iterations": self.iterations, "busy_seconds": self.busy_seconds, "span_seconds": span}


def percentile(xs: list[float], q: float) -> float:
    """The ``q``-th percentile, linear between the closest ranks (numpy's default)."""
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def replay(engine, trace, policy: str, rate: float, clock=time.perf_counter) -> Point:
    """Serve ``trace`` (``Experiment.trace``) on ``engine`` (empty, set up) as the requests arrive;
    EOS is ignored, so every request generates its full output length."""
    from orca_compile import SamplingParams

    if engine.has_unfinished_requests():
        raise ValueError("replay needs an empty engine")
    n = len(trace)
    first = [math.nan] * n
    finish = [math.nan] * n
    now, busy, nxt, iterations = 0.0, 0.0, 0, 0
    while nxt < n or engine.has_unfinished_requests():
        if not engine.has_unfinished_requests() and trace[nxt][0] > now:
            now = trace[nxt][0]  # idle: the next arrival
        start = clock()
        while nxt < n and trace[nxt][0] <= now:
            _, prompt, g = trace[nxt]
            engine.add_request(str(nxt), prompt, SamplingParams(max_tokens=g, ignore_eos=True))
            nxt += 1
        outputs = engine.step()
        spent = clock() - start
        now += spent
        busy += spent
        iterations += 1
        for out in outputs:
            i = int(out.request_id)
            if math.isnan(first[i]):
                first[i] = now
            if out.finished:
                if len(out.token_ids) != trace[i][2]:
                    raise RuntimeError(f"request {i} finished with {len(out.token_ids)} tokens, not {trace[i][2]}")
                finish[i] = now
    missing = [i for i in range(n) if math.isnan(finish[i])]
    if missing:
        raise RuntimeError(f"requests {missing[:5]} never finished")
    return Point(policy, rate, [a for a, _, _ in trace], first, finish, [g for _, _, g in trace], iterations, busy)


def throughput_at(points: list[dict], latency: float) -> float | None:
    """The throughput a curve reaches at median normalized latency ``latency``: the highest over
    its points within it, and, where two neighbouring points (by rate) straddle it, the linear
    interpolation between them. None if no point is within it."""
    pts = sorted(points, key=lambda p: p["rate"])
    best = None
    for i, p in enumerate(pts):
        if p["median_normalized_latency"] <= latency:
            best = max(best or 0.0, p["throughput"])
        if i and (pts[i - 1]["median_normalized_latency"] <= latency < p["median_normalized_latency"]):
            a, b = pts[i - 1], p
            f = (latency - a["median_normalized_latency"]) / (b["median_normalized_latency"]
                                                             - a["median_normalized_latency"])
            best = max(best or 0.0, a["throughput"] + f * (b["throughput"] - a["throughput"]))
    return best


def run(names=("orca", "fastserve"), *, rates=None, num_requests=None, backend="auto", policy_options=None,
        log=print) -> dict:
    """Run each experiment: per policy one engine (compiled once for all), warmed up; then at each
    rate the same trace replayed on each engine in turn. Returns the report (every point's summary
    and per-request figures, by policy then rate)."""
    import torch  # noqa: F401  (the engine's)

    import orca_compile
    from orca_compile.presets import load_model

    report = {}
    compiled_for = {}
    for name in names:
        if name not in EXPERIMENTS:
            raise ValueError(f"unknown experiment {name!r}; one of {', '.join(EXPERIMENTS)}")
        e = EXPERIMENTS[name]
        if num_requests is not None:
            e = dataclasses.replace(e, num_requests=num_requests)
        if rates is not None:
            e = dataclasses.replace(e, rates=tuple(rates))
        key = (e.model, e.dtype)
        if key not in compiled_for:
            compiled_for[key] = orca_compile.compile(load_model(e.model, dtype=e.dtype), keep_stages=False)
        compiled = compiled_for[key]
        lengths = e.lengths()
        log(f"experiment {e.name}: {e.model} {e.dtype}, {e.num_requests} requests, prompts "
            f"{statistics.fmean(n for n, _ in lengths):.1f} tokens on average, outputs "
            f"{statistics.fmean(g for _, g in lengths):.1f} (max {max(g for _, g in lengths)}); "
            f"max_num_seqs {e.max_num_seqs}, rates {', '.join(f'{r:g}' for r in e.rates)} requests/s")
        longest = max(n + g for n, g in lengths)
        points = []
        engines = {}
        try:
            for policy in e.policies:
                opts = (policy_options or {}).get(policy, {})
                resident = e.max_num_seqs * (opts.get("resident_factor", 2) if policy == "mlfq" else 1)
                blocks = resident * -(-longest // DEFAULTS.block_size) + 1  # room for every resident: no preemption by memory
                engines[policy] = engine = orca_compile.optimize(
                    compiled, policy=policy, policy_options=opts, max_num_seqs=e.max_num_seqs,
                    max_num_batched_tokens=e.max_num_batched_tokens, num_kv_blocks=blocks, backend=backend)
                warm = e.trace(compiled.vocab_size, 1e6)[: 2 * e.max_num_seqs]  # untimed: a burst, then done
                replay(engine, warm, policy, 1e6)
            # rate by rate, the policies back to back, their order rotated at each rate: a drift of
            # the machine over the run lands on every policy alike
            for i, rate in enumerate(e.rates):
                trace = e.trace(compiled.vocab_size, rate)
                for policy in e.policies[i % len(e.policies):] + e.policies[:i % len(e.policies)]:
                    p = replay(engines[policy], trace, policy, rate)
                    s = p.summary()
                    points.append(s | {"jct": p.jct, "output_len": p.output_len})
                    log(f"  {policy:6} {rate:6.1f} req/s: throughput {s['throughput']:6.2f} req/s, median "
                        f"normalized latency {s['median_normalized_latency'] * 1e3:7.1f} ms/token, JCT mean "
                        f"{s['mean_jct']:6.2f} s p99 {s['p99_jct']:6.2f} s ({s['iterations']} iterations, "
                        f"busy {s['busy_seconds']:.1f} of {s['span_seconds']:.1f} s)")
        finally:
            for engine in engines.values():
                engine.shutdown()
        points.sort(key=lambda p: (e.policies.index(p["policy"]), p["rate"]))
        report[e.name] = {"experiment": dataclasses.asdict(e), "points": points}
    return report


def compare(report: dict, log=print) -> dict:
    """The figures the papers report, from the run's points: iteration-level over request-level
    throughput at equal median normalized latency (Orca), and MLFQ's mean and tail JCT against
    FCFS at each rate (FastServe). Each latency level compared is one the request-level curve
    reaches, so both curves have a throughput there."""
    out = {}
    for name, res in report.items():
        by = {}
        for p in res["points"]:
            by.setdefault(p["policy"], []).append(p)
        if "static" in by:
            levels = sorted({p["median_normalized_latency"] for p in by["static"]})
            rows = []
            for level in levels:
                base = throughput_at(by["static"], level)
                row = {"latency": level, "static": base}
                for other in ("fcfs", "mlfq"):
                    if other in by:
                        t = throughput_at(by[other], level)
                        row[other] = t
                        row[f"{other}_over_static"] = None if t is None else t / base
                rows.append(row)
                log(f"{name}: at median normalized latency {level * 1e3:.0f} ms/token: static {base:.2f} req/s"
                    + "".join(f", {o} {row[o]:.2f} ({row[o + '_over_static']:.2f}x)" for o in ("fcfs", "mlfq")
                              if row.get(o) is not None))
            out[f"{name}_throughput_at_equal_latency"] = rows
        if "fcfs" in by and "mlfq" in by:
            rows = []
            mlfq_at = {p["rate"]: p for p in by["mlfq"]}
            for a in sorted(by["fcfs"], key=lambda p: p["rate"]):
                b = mlfq_at.get(a["rate"])
                if b is None:
                    continue
                row = {"rate": a["rate"]}
                for k in ("mean_jct", "p95_jct", "p99_jct", "median_normalized_latency"):
                    row[k] = {"fcfs": a[k], "mlfq": b[k], "fcfs_over_mlfq": a[k] / b[k]}
                short = [j for j, g in zip(a["jct"], a["output_len"]) if g <= 16], \
                    [j for j, g in zip(b["jct"], b["output_len"]) if g <= 16]
                if short[0]:
                    row["mean_jct_outputs_le_16"] = {"fcfs": statistics.fmean(short[0]),
                                                     "mlfq": statistics.fmean(short[1])}
                rows.append(row)
                log(f"{name}: {a['rate']:g} req/s: mean JCT fcfs {a['mean_jct']:.2f} s, mlfq {b['mean_jct']:.2f} s "
                    f"({row['mean_jct']['fcfs_over_mlfq']:.2f}x); p99 fcfs {a['p99_jct']:.2f} s, mlfq "
                    f"{b['p99_jct']:.2f} s ({row['p99_jct']['fcfs_over_mlfq']:.2f}x)")
            out[f"{name}_mlfq_against_fcfs"] = rows
    return out


COLORS = {"static": "C0", "fcfs": "C1", "mlfq": "C2", "priority": "C3"}


def plot(report: dict, directory: str) -> list[str]:
    """PNG plots of the run in ``directory``: per experiment, throughput against median normalized
    latency and JCT (mean, p99) against the arrival rate, a line per policy. Needs matplotlib.
    ``report``: ``run()``'s, or the ``experiments`` of a saved JSON report (to redraw it)."""
    import os

    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("the plots need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    paths = []
    for name, res in report.items():
        by = {}
        for p in res["points"]:
            by.setdefault(p["policy"], []).append(p)
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
        for policy, pts in by.items():
            pts = sorted(pts, key=lambda p: p["rate"])
            color = COLORS.get(policy)  # one colour per policy in every plot
            ax1.plot([p["throughput"] for p in pts], [p["median_normalized_latency"] * 1e3 for p in pts],
                     marker="o", color=color, label=policy)
            ax2.plot([p["rate"] for p in pts], [p["mean_jct"] for p in pts], marker="o", color=color,
                     label=f"{policy} mean")
            ax2.plot([p["rate"] for p in pts], [p["p99_jct"] for p in pts], marker="x", linestyle="--",
                     color=color, label=f"{policy} p99")
        e = res["experiment"]
        ax1.set_xlabel("throughput (requests/s)")
        ax1.set_ylabel("median normalized latency (ms/token)")
        ax1.set_yscale("log")
        ax1.set_title(f"{name}: throughput against latency")
        ax1.legend()
        ax2.set_xlabel("arrival rate (requests/s, Poisson)")
        ax2.set_ylabel("job completion time (s)")
        ax2.set_yscale("log")
        ax2.set_title(f"{name}: JCT, {e['num_requests']} requests per point")
        ax2.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(directory, f"bench_{name.replace('-', '_')}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
