"""A benchmark run's report (a JSON-able dict) and the lines it prints."""
from __future__ import annotations

import dataclasses

from orca_compile.bench import stats
from orca_compile.bench.systems import ENGINE_VARIANTS


def run_line(res, settled) -> str:
    steal = res.extra.get("cpu_steal_seconds")
    return (f"  {res.system:38} {res.seconds:8.2f} s {res.tokens_per_second:9.1f} tok/s "
            f"(set-up {res.setup_seconds:.1f} s" + ("" if steal is None else f"; CPU stolen {steal:.2f} s")
            + (f"; settled {settled[0]:.0f} s first" if settled else "") + ")")


def build(w, systems, rounds, tokens, *, flops, rate, floor, bandwidth, threads, repeat, isolate, max_num_seqs,
          log) -> dict:
    """The report of a run: each system's median round and every round's time, and the engine's
    speed-ups (median of the per-round ratios) over every other system; logs the comparisons."""
    results = [stats.median_round(rounds[s]) for s in systems]
    report = {"workload": dataclasses.asdict(w), "flops": flops, "matmul_rate": rate, "compute_floor_s": floor,
              "read_bandwidth_before": bandwidth[0], "read_bandwidth_after": bandwidth[1],
              "threads": threads, "repeat": repeat, "isolated": isolate,
              "results": [dataclasses.asdict(res) | {"tokens_per_second": res.tokens_per_second,
                                                     "rounds_seconds": [x.seconds for x in rounds[s]]}
                          for s, res in zip(systems, results)]}
    if "engine" not in tokens:
        return report
    eng = results[list(systems).index("engine")]
    report["engine_over_floor"] = eng.seconds / floor
    log(f"engine time / compute floor: {report['engine_over_floor']:.2f}x")
    for other, res in zip(systems, results):
        if other == "engine":
            continue
        ratios = stats.round_ratios(rounds[other], rounds["engine"])
        ratio = stats.median_ratio(ratios)
        spread = f" (rounds: {', '.join(f'{x:.2f}' for x in ratios)})" if repeat > 1 else ""
        same = stats.agreement(tokens["engine"], tokens[other])
        report[f"same_tokens_as_{other}"] = same
        if other in ENGINE_VARIANTS:
            report[f"engine_over_{other}"] = ratio
            log(f"engine ({eng.system}) is {ratio:.2f}x {res.system}'s speed{spread}; same tokens for "
                f"{same:.0%} of requests")
            continue
        report[f"speedup_over_{other}"] = ratio
        if repeat > 1:
            report[f"speedup_over_{other}_rounds"] = ratios
        log(f"engine speed-up over {res.system}: {ratio:.2f}x{spread}; same tokens for {same:.0%} of requests")
    if eng.extra.get("streamed_weight_bytes") and "decode_iteration_ms" in eng.extra:
        x = eng.extra
        stream_ms = 1e3 * x["streamed_weight_bytes"] / bandwidth[0]
        report["engine_decode_over_weight_stream"] = x["decode_iteration_ms"] / stream_ms
        # the read rate drifts on a shared machine (by up to 25% between the two measurements in
        # docs/benchmarks.md's W2 runs): the ratio at the rate measured after the systems too
        report["engine_decode_over_weight_stream_after"] = (
            x["decode_iteration_ms"] / (1e3 * x["streamed_weight_bytes"] / bandwidth[1]))
        log(f"engine decode iterations: median {x['decode_iteration_ms']:.1f} ms (median batch "
            f"{x['decode_batch_median']:g}, {x['decode_iterations']} iterations); its "
            f"{x['streamed_weight_bytes'] / 1e6:.0f} MB of weights at the measured {bandwidth[0] / 1e9:.1f} GB/s take "
            f"{stream_ms:.1f} ms: {report['engine_decode_over_weight_stream']:.2f}x (at the "
            f"{bandwidth[1] / 1e9:.1f} GB/s measured after the systems: "
            f"{report['engine_decode_over_weight_stream_after']:.2f}x)")
    for other, res in zip(systems, results):  # another engine's decode steps against the engine's
        if other in ENGINE_VARIANTS and "decode_iteration_ms" in res.extra and "decode_iteration_ms" in eng.extra:
            ratio = res.extra["decode_iteration_ms"] / eng.extra["decode_iteration_ms"]
            report[f"decode_iteration_{other}_over_engine"] = ratio
            log(f"{other}'s decode iterations take {ratio:.2f}x the engine's ({res.extra['decode_iteration_ms']:.1f} "
                f"ms against {eng.extra['decode_iteration_ms']:.1f} ms)")
    if "full_batch_overhead_share" in eng.extra:
        x = eng.extra
        log(f"engine iterations: {x['iterations']}; decode-only with all {min(max_num_seqs, w.num_requests)} requests "
            f"in the batch: median {x['full_batch_iteration_ms']:.1f} ms, "
            f"CPU overhead {x['full_batch_overhead_ms']:.2f} ms = {x['full_batch_overhead_share']:.1%} "
            f"({', '.join(f'{k} {v:.2f}' for k, v in x['overhead_breakdown_ms'].items())} ms)")
    return report
