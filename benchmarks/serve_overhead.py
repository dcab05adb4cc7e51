"""What serving over HTTP costs: a workload's requests sent at once to ``orca-compile serve`` (a
process of its own, one client thread per request, non-streamed) against the same requests given
to ``engine.generate`` in this process, same run, rounds alternating in order (ABBA).

    python benchmarks/serve_overhead.py [WORKLOAD] [ROUNDS] [--json PATH]
    python benchmarks/serve_overhead.py [WORKLOAD] [ROUNDS] --against engine-thread [--json PATH]

``--against engine-thread`` times, in place of the server, the same engine driven by
``EngineLoop`` from this process (no HTTP): what running the engine on a thread of its own costs.

Both engines are built with the workload's options (``max_num_seqs``, token budget; greedy,
``ignore_eos``: every request produces its stated length) and warmed with one pass before the
rounds. Reported per system: the median wall time of its rounds and tokens per second; the ratio
HTTP / in-process; and whether the HTTP tokens equal the in-process ones (greedy: they must). The
client threads run in this process, on the same cores as the server: what a client on another
machine would not cost the server, counted here against it.
"""
from __future__ import annotations

import argparse
import http.client
import json
import re
import signal
import statistics
import subprocess
import sys
import threading
import time


def _start_server(w) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "orca_compile.cli", "serve", w.source(), "--port", "0",
           "--max-num-seqs", str(w.max_num_seqs), "--max-num-batched-tokens", str(w.max_num_batched_tokens)]
    if w.dtype:
        cmd += ["--dtype", w.dtype]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    port = []

    def read():
        for line in proc.stderr:
            m = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
            if m:
                port.append(int(m.group(1)))

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 600
    while not port:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the server did not start")
        time.sleep(0.1)
    return proc, port[0]


def _iterations(port) -> float:
    """The server's iteration count, from its /metrics."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return float(re.search(r"^orca_iterations_total\{[^}]*\} (\S+)$", text, re.M).group(1))


def _http_round(port, reqs) -> tuple[float, list[list[int]]]:
    out = [None] * len(reqs)

    def client(i, prompt, n):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True}
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        res = conn.getresponse()
        text = res.read()
        conn.close()
        assert res.status == 200, text
        out[i] = json.loads(text)["choices"][0]["token_ids"]

    threads = [threading.Thread(target=client, args=(i, p, n)) for i, (p, n) in enumerate(reqs)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, out


def _thread_round(loop, reqs, tag) -> tuple[float, list[list[int]]]:
    from orca_compile import SamplingParams

    out, left, done, lock = [None] * len(reqs), [len(reqs)], threading.Event(), threading.Lock()

    def sink(i):
        def take(item):
            assert not isinstance(item, Exception), item
            if item["finished"]:
                out[i] = item["token_ids"]
                with lock:
                    left[0] -= 1
                    if not left[0]:
                        done.set()
        return take

    from orca_compile.runtime.engine_loop import whole

    start = time.perf_counter()
    for i, (p, n) in enumerate(reqs):
        loop.submit(f"{tag}-{i}", p, SamplingParams(max_tokens=n, ignore_eos=True), 0, whole(sink(i)))
    done.wait()
    return time.perf_counter() - start, out


def _local_round(engine, reqs) -> tuple[float, list[list[int]]]:
    from orca_compile import SamplingParams

    start = time.perf_counter()
    outs = engine.generate([p for p, _ in reqs], [SamplingParams(max_tokens=n, ignore_eos=True) for _, n in reqs])
    return time.perf_counter() - start, [o.token_ids for o in outs]


def main() -> None:
    import orca_compile
    from orca_compile.bench import WORKLOADS

    ap = argparse.ArgumentParser()
    ap.add_argument("workload", nargs="?", default="w1")
    ap.add_argument("rounds", nargs="?", type=int, default=4)
    ap.add_argument("--json", default=None)
    ap.add_argument("--against", choices=["http", "engine-thread"], default="http")
    args = ap.parse_args()
    w = WORKLOADS[args.workload]
    engine = orca_compile.optimize(w.source(), dtype=w.dtype, max_num_seqs=w.max_num_seqs,
                                   max_num_batched_tokens=w.max_num_batched_tokens)
    reqs = w.requests(engine.info.vocab_size)
    tokens = sum(n for _, n in reqs)
    other = args.against
    if other == "http":
        proc, port = _start_server(w)
        run_other, count = (lambda r: _http_round(port, reqs)), (lambda: _iterations(port))
    else:
        from orca_compile.runtime.engine_loop import EngineLoop

        proc, loop = None, EngineLoop(engine).start()  # idle while generate() runs on this thread
        run_other, count = (lambda r: _thread_round(loop, reqs, f"r{r}")), (lambda: engine.num_iterations)
    try:
        _local_round(engine, reqs)  # warm both: kernels built, allocator settled
        run_other(-1)
        times = {"in-process": [], other: []}
        iterations = {"in-process": [], other: []}  # a late arrival can cost the batch iterations
        same = []
        for r in range(args.rounds):
            order = ("in-process", other) if r % 4 in (0, 3) else (other, "in-process")
            for name in order:
                before = engine.num_iterations if name == "in-process" else count()
                seconds, ids = _local_round(engine, reqs) if name == "in-process" else run_other(r)
                times[name].append(seconds)
                iterations[name].append((engine.num_iterations if name == "in-process" else count()) - before)
                if name == other:
                    same.append(ids)
                else:
                    local_ids = ids
            print(f"round {r + 1}: in-process {times['in-process'][-1]:.2f} s ({iterations['in-process'][-1]:.0f} "
                  f"iterations), {other} {times[other][-1]:.2f} s ({iterations[other][-1]:.0f})", flush=True)
        same_tokens = all(ids == local_ids for ids in same)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        else:
            loop.stop()
        engine.shutdown()
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = [h / i for h, i in zip(times[other], times["in-process"])]
    report = {"workload": w.name, "model": w.model, "requests": len(reqs), "tokens": tokens, "rounds": args.rounds,
              "against": other, "seconds": times, "median_seconds": med, "iterations": iterations,
              "tokens_per_second": {k: tokens / v for k, v in med.items()},
              f"{other}_over_in_process_rounds": ratios, f"{other}_over_in_process_median": statistics.median(ratios),
              "same_tokens": same_tokens}
    print(json.dumps({k: report[k] for k in ("tokens_per_second", f"{other}_over_in_process_median", "same_tokens")},
                     indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
