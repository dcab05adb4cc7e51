"""``orca-compile demo``: compile the default model, show what the passes did, then serve a stream
of staggered requests one iteration at a time, with a live view of who is in each batch."""
from __future__ import annotations

import random
import sys
import time



def iteration_line(it, engine) -> str:
    """One row of the live table: the batch (P: prefill chunk, D: decode), tokens, KV use."""
    batch = " ".join(f"{rid}:D" if n == 1 else f"{rid}:P{n}" for rid, n in zip(it.request_ids, it.num_scheduled_tokens))
    if len(batch) > 64:
        batch = batch[:61] + "..."
    kv = f"{it.kv_blocks_used}/{engine.config.num_kv_blocks}"
    pre = f" preempted {it.num_preempted}" if it.num_preempted else ""
    return (f"{it.iteration:5d} {it.num_prefill_tokens:6d} {it.num_decode_tokens:5d} {it.num_running:4d} "
            f"{it.num_waiting:4d} {kv:>9} {1e3 * it.seconds:7.1f}  {batch}{pre}")


HEADER = " iter prefill decode  run wait   KV used      ms  batch (id:Pn prefill chunk of n, id:D decode)"


def run_demo(model_name: str, num_requests: int = 12, seed: int = 0, max_num_seqs: int = 6,
             max_num_batched_tokens: int = 48, num_kv_blocks: int = 40, block_size: int = 8,
             dtype: str = "float32", device: str | None = None, policy: str = "fcfs", out=None) -> dict:
    import orca_compile
    from orca_compile import SamplingParams, dump
    from orca_compile.presets import load_model

    out = out or sys.stdout  # looked up now: a default bound at import would outlive a redirected stdout
    if isinstance(num_requests, bool) or not isinstance(num_requests, int) or num_requests < 1:
        raise ValueError(f"the demo needs at least 1 request, got {num_requests!r}")
    model = load_model(model_name, dtype=dtype, device=device)
    compiled = orca_compile.compile(model, backend="auto")  # every stage, down to the graph that runs here
    print(dump.summary(compiled), file=out)
    engine = orca_compile.optimize(compiled, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                   block_size=block_size, num_kv_blocks=num_kv_blocks, policy=policy)
    rng = random.Random(seed)
    longest = min(compiled.max_model_len or 512, num_kv_blocks * block_size) // 2
    arrivals = sorted((rng.randint(0, 3 * num_requests), f"r{i}") for i in range(num_requests))
    plan = {rid: ([rng.randrange(1, compiled.vocab_size) for _ in range(rng.randint(4, longest // 2))],
                  SamplingParams(max_tokens=rng.randint(4, longest // 2), ignore_eos=True), rng.randint(0, 3))
            for _, rid in arrivals}  # (prompt, params, priority: the priority policy's, lower first)
    print(f"\nserving {num_requests} requests arriving over {arrivals[-1][0] + 1} iterations "
          f"(max_num_seqs={max_num_seqs}, token budget {max_num_batched_tokens}, {num_kv_blocks} KV blocks "
          f"of {block_size}; backend {engine.backend}; policy {policy}):\n", file=out)
    print(HEADER, file=out)
    iteration, finished, start = 0, [], time.perf_counter()
    while arrivals or engine.has_unfinished_requests():
        joined = []
        while arrivals and arrivals[0][0] <= iteration:
            rid = arrivals.pop(0)[1]
            prompt, params, priority = plan[rid]
            engine.add_request(rid, prompt, params, priority=priority)
            joined.append(f"{rid}(p{priority})" if policy == "priority" else rid)
        before = engine.num_iterations
        outs = engine.step()
        iteration += 1
        if engine.num_iterations == before:  # nobody had arrived yet
            continue
        line = iteration_line(engine.last_iteration, engine)
        done = [o.request_id for o in outs if o.finished]
        finished += done
        extra = (f"  + {','.join(joined)} joined" if joined else "") + (f"  - {','.join(done)} done" if done else "")
        print(line + extra, file=out, flush=True)
    seconds = time.perf_counter() - start
    s = engine.stats()
    print(f"\n{len(finished)} requests, {s['num_generated_tokens']} tokens generated in {s['num_iterations']} "
          f"iterations, {seconds:.2f} s: {s['num_generated_tokens'] / seconds:.1f} tokens/s; "
          f"{s['num_preemptions']} preemptions (recompute); KV blocks in use at the end: {s['kv_blocks_used']}",
          file=out)
    engine.shutdown()
    return s

