"""`orca-compile bench orca`: Poisson arrivals replayed against the engine under each policy
(orca_compile/bench/online.py). The figures live in docs/benchmarks.md; here the replay's clock,
the workload's draws, the comparisons' arithmetic and the command's outputs."""
import itertools
import json
import math
import random

import pytest

import orca_compile
from orca_compile.bench import online
from orca_compile.cli import main
from tests.conftest import compiled_preset


@pytest.fixture(scope="module")
def tiny_llama():
    return compiled_preset("tiny-llama")[1]


class StepClock:
    """A clock read twice per pass of the serving loop (before admitting, after the step): each
    pass costs exactly ``cost`` seconds, so a replay's times count iterations."""

    def __init__(self, cost=0.5):
        self.cost, self.calls = cost, itertools.count()

    def __call__(self):
        return (next(self.calls) + 1) // 2 * self.cost


def _engine(tiny_llama, policy, max_num_seqs=4):
    return orca_compile.optimize(tiny_llama, policy=policy, max_num_seqs=max_num_seqs, max_num_batched_tokens=64,
                                 num_kv_blocks=64, block_size=4)  # in-process: released with the object


def _trace(lengths, gaps, vocab=256, seed=0):
    rng = random.Random(seed)
    t, out = 0.0, []
    for (n, g), gap in zip(lengths, gaps):
        t += gap
        out.append((t, [rng.randrange(vocab) for _ in range(n)], g))
    return out


def test_a_request_alone_takes_one_pass_per_token_and_the_clock_jumps_over_idle_time(tiny_llama):
    # arrivals 100 s apart, each pass 0.5 s: every request runs alone, its prompt in one pass
    # (under the token budget) that gives its first token, then a pass per further token
    lengths = [(10, 3), (30, 1), (5, 7)]
    trace = _trace(lengths, [100.0] * 3)
    p = online.replay(_engine(tiny_llama, "fcfs"), trace, "fcfs", 0.01, clock=StepClock(0.5))
    assert p.arrivals == [100.0, 200.0, 300.0]
    assert p.jct == [0.5 * g for _, g in lengths]
    assert [f - a for f, a in zip(p.first_token, p.arrivals)] == [0.5] * 3
    assert p.iterations == sum(g for _, g in lengths) and p.busy_seconds == 0.5 * p.iterations
    s = p.summary()
    assert s["span_seconds"] == p.finish[-1] - 100.0 and s["throughput"] == 3 / s["span_seconds"]
    assert s["median_normalized_latency"] == 0.5 and s["mean_jct"] == pytest.approx(0.5 * 11 / 3)


def test_iteration_level_scheduling_beats_request_level_on_a_burst(tiny_llama):
    # a burst of 12 with outputs 1-16 tokens and 4 slots, each pass costing the same: under
    # static a batch waits for its longest member before anyone new joins; under fcfs a slot
    # freed at one iteration is taken at the next
    rng = random.Random(3)
    lengths = [(rng.randint(4, 12), rng.choice((1, 2, 16))) for _ in range(12)]
    trace = _trace(lengths, [0.01] * 12)
    res = {}
    for policy in ("static", "fcfs"):
        engine = _engine(tiny_llama, policy)
        res[policy] = online.replay(engine, trace, policy, 100.0, clock=StepClock(1.0)).summary()
        assert not engine.has_unfinished_requests() and engine.block_manager.num_used_blocks == 0
    assert res["fcfs"]["mean_jct"] < res["static"]["mean_jct"]
    assert res["fcfs"]["span_seconds"] < res["static"]["span_seconds"]
    assert res["fcfs"]["throughput"] > res["static"]["throughput"]


def test_replay_refuses_a_busy_engine_and_checks_every_output_length(tiny_llama):
    engine = _engine(tiny_llama, "fcfs")
    engine.add_request("x", [1, 2, 3], orca_compile.SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="empty engine"):
        online.replay(engine, _trace([(4, 2)], [1.0]), "fcfs", 1.0)


def test_the_experiments_draw_the_same_requests_at_every_rate():
    e = online.EXPERIMENTS["orca"]
    a, b = e.trace(1000, 2.0), e.trace(1000, 8.0)
    assert [x[1:] for x in a] == [x[1:] for x in b]  # the same prompts and output lengths
    assert [x[0] for x in a] == pytest.approx([4 * x[0] for x in b])  # arrivals scaled by the rate
    assert all(8 <= len(p) <= 128 and 1 <= g <= 32 for _, p, g in a)  # Orca's lengths / 4
    gaps = [y[0] - x[0] for x, y in zip(a, a[1:])]
    assert 0.35 < sum(gaps) / len(gaps) < 0.65  # Poisson at 2/s: mean gap 0.5 s (120 draws)
    with pytest.raises(ValueError, match="rate must be > 0"):
        e.trace(1000, 0)


def test_bounded_pareto_is_its_inverse_cdf():
    assert online.bounded_pareto(0.0, 1.0, 4, 256) == 4
    assert online.bounded_pareto(0.999999999, 1.0, 4, 256) == 255  # just under the bound, rounded down
    # P(X > x) = (lo/x - lo/hi) / (1 - lo/hi) for alpha 1: the median is 2 lo hi / (hi + lo)
    assert online.bounded_pareto(0.5, 1.0, 4, 256) == int(2 * 4 * 256 / 260)
    rng = random.Random(0)
    draws = [online.bounded_pareto(rng.random(), 1.0, 4, 256) for _ in range(20000)]
    tail = (4 / 65 - 4 / 256) / (1 - 4 / 256)  # X >= 65, i.e. the draw rounds down to more than 64
    assert abs(sum(d > 64 for d in draws) / len(draws) - tail) < 0.006  # 4 sigma of 20000 draws
    assert min(draws) == 4 and max(draws) <= 256


def _pt(policy, rate, tput, lat, **kw):
    return {"policy": policy, "rate": rate, "throughput": tput, "median_normalized_latency": lat} | kw


def test_throughput_at_a_latency_interpolates_between_the_points_that_straddle_it():
    curve = [_pt("fcfs", 1, 1.0, 0.1), _pt("fcfs", 2, 2.0, 0.2), _pt("fcfs", 4, 3.0, 0.6)]
    assert online.throughput_at(curve, 0.05) is None
    assert online.throughput_at(curve, 0.1) == 1.0
    assert online.throughput_at(curve, 0.4) == pytest.approx(2.5)
    assert online.throughput_at(curve, 9.0) == 3.0  # past its last point: the most it was seen to do
    # a curve whose latency dips as the rate grows: the highest throughput within the level wins
    assert online.throughput_at([_pt("x", 1, 1.0, 0.3), _pt("x", 2, 2.0, 0.2)], 0.25) == 2.0


def test_compare_reports_the_papers_ratios():
    def timed(policy, rate, tput, lat, jct):
        return _pt(policy, rate, tput, lat, mean_jct=sum(jct) / 2, p95_jct=max(jct), p99_jct=max(jct), jct=jct,
                   output_len=[4, 200])

    points = [_pt("static", 1, 1.0, 0.1), _pt("static", 2, 1.5, 0.5),
              timed("fcfs", 1, 1.0, 0.05, [1.0, 1.0]), timed("fcfs", 2, 2.0, 0.1, [1.0, 2.0]),
              timed("fcfs", 3, 4.0, 0.9, [1.0, 9.0]), timed("mlfq", 3, 3.0, 0.2, [0.5, 10.0])]
    out = online.compare({"x": {"points": points}}, log=lambda line: None)
    eq = {r["latency"]: r for r in out["x_throughput_at_equal_latency"]}
    assert set(eq) == {0.1, 0.5}  # the levels the request-level curve reaches
    assert eq[0.1]["static"] == 1.0 and eq[0.1]["fcfs"] == 2.0 and eq[0.1]["fcfs_over_static"] == 2.0
    assert eq[0.1]["mlfq"] is None and eq[0.1]["mlfq_over_static"] is None
    assert eq[0.5]["static"] == 1.5 and eq[0.5]["fcfs"] == pytest.approx(3.0)  # halfway from 0.1 to 0.9
    assert eq[0.5]["mlfq_over_static"] == 2.0
    (row,) = out["x_mlfq_against_fcfs"]  # only the rate both ran at
    assert row["rate"] == 3 and row["mean_jct"] == {"fcfs": 5.0, "mlfq": 5.25, "fcfs_over_mlfq": 5.0 / 5.25}
    assert row["p99_jct"]["fcfs_over_mlfq"] == 0.9
    assert row["mean_jct_outputs_le_16"] == {"fcfs": 1.0, "mlfq": 0.5}


def test_bench_orca_tiny_writes_the_report_and_the_plots(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["bench", "orca-tiny", "--requests", "12", "--rates", "4000", "--plot-dir", str(tmp_path),
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    orca, fast = report["experiments"]["orca-tiny"], report["experiments"]["fastserve-tiny"]
    assert [p["policy"] for p in orca["points"]] == ["static", "fcfs", "mlfq"]
    assert [p["policy"] for p in fast["points"]] == ["fcfs", "mlfq"]
    for p in orca["points"] + fast["points"]:
        assert p["rate"] == 4000 and len(p["jct"]) == 12 and all(j > 0 for j in p["jct"])
        assert p["p99_jct"] >= p["p50_jct"] > 0 and math.isfinite(p["median_normalized_latency"])
    lengths = online.EXPERIMENTS["fastserve-tiny"].lengths()[:12]
    assert fast["points"][0]["output_len"] == [g for _, g in lengths]
    assert report["comparisons"]["orca-tiny_throughput_at_equal_latency"]
    assert len(report["comparisons"]["fastserve-tiny_mlfq_against_fcfs"]) == 1
    for name in ("bench_orca_tiny.png", "bench_fastserve_tiny.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "median normalized latency" in capsys.readouterr().out
