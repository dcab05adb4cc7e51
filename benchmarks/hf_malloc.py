"""HF continuous batching on W1 with glibc's default malloc settings and with the engine's tuning
(`runtime/host.py`: `tune_malloc`, which an `Engine` applies to its whole process), each in a fresh
process, alternating, after the machine settled. Why `orca-compile bench` isolates the systems
by default: in the engine's process, HF ran with the engine's tuning.

    python benchmarks/hf_malloc.py [PAIRS]       # default 2 pairs
"""
from __future__ import annotations

import json
import subprocess
import sys

CHILD = """
import json, os, sys
from orca_compile import bench, host_probes
from orca_compile.presets import load_model
if sys.argv[1] == "tuned":
    from orca_compile.runtime.host import tune_malloc
    assert tune_malloc()
w = bench.WORKLOADS["w1"]
model = load_model(w.model, dtype=w.dtype)
reqs = w.requests(model.config.vocab_size)
host_probes.settle(5)
t0 = os.times()
res, _ = bench.run_hf_continuous(model, reqs)
t1 = os.times()
print(json.dumps({"seconds": res.seconds, "stolen": res.extra["cpu_steal_seconds"],
                  "system_cpu_s": t1.system - t0.system}))
"""


def main():
    pairs = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    times = {"default": [], "tuned": []}
    for i in range(pairs):
        for mode in (("default", "tuned") if i % 2 == 0 else ("tuned", "default")):
            out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            times[mode].append(r["seconds"])
            print(f"{mode:8} malloc: HF continuous batching {r['seconds']:.2f} s (CPU stolen {r['stolen']:.2f} s; "
                  f"system CPU incl. its warm-up {r['system_cpu_s']:.1f} s)", flush=True)
    for mode, t in times.items():
        print(f"{mode}: {min(t):.2f}-{max(t):.2f} s")


if __name__ == "__main__":
    main()
