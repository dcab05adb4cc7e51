"""The serving benchmark's harness on the tiny W1 variant (the figures themselves live in
docs/benchmarks.md; here: every system produces every requested token, and the report adds up)."""
from orca_compile import bench


def test_w1_tiny_engine_and_hf_static_produce_every_requested_token():
    lines = []
    report = bench.run("w1-tiny", systems=("engine", "hf-static"), log=lines.append)
    w = bench.WORKLOADS["w1-tiny"]
    reqs = w.requests(256)
    wanted = sum(n for _, n in reqs)
    engine, static = report["results"]
    assert engine["useful_tokens"] == static["useful_tokens"] == wanted
    # static batches run each batch to its longest output: more tokens generated than useful
    assert static["extra"]["generated_incl_padding_waste"] > wanted
    assert engine["extra"]["iterations"] >= max(n for _, n in reqs)
    assert 0 < engine["extra"]["full_batch_overhead_share"] < 1
    assert report["compute_floor_s"] > 0 and report["engine_over_floor"] > 0
    # the machine's memory bandwidth, before and after the systems ran (it moves on a shared host)
    assert report["read_bandwidth_before"] > 1e8 and report["read_bandwidth_after"] > 1e8
    assert any(l.startswith("DRAM read rate") for l in lines)
    assert any("compute floor" in l for l in lines) and any("speed-up over HF generate" in l for l in lines)
