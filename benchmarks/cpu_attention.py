"""The CPU choices of the reference attention and the engine, each against its alternative in the
same run, at W1's decode shapes (GPT-2 small: 12 heads of 64; 32 decodes, contexts 20-190, cache
blocks of 16) and at its prefill shapes (fresh prompts of 16-128 tokens filling a 512-token
iteration; and 512-token chunks on cached contexts). docs/benchmarks.md quotes its output.

    python benchmarks/cpu_attention.py            # gather, attention form, length buckets, C kernel
    python benchmarks/cpu_attention.py --malloc   # also W1's engine with and without malloc tuning
"""
from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time

import torch

from orca_compile.kernels import attention_ref as ref


def timed(fn, reps=50):
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e3


def decode_batch(seed=0, num_reqs=32, heads=12, head_dim=64, block_size=16, num_blocks=600):
    torch.manual_seed(seed)
    rng = random.Random(seed)
    kc, vc = (torch.randn(num_blocks, block_size, heads, head_dim) for _ in range(2))
    lens = [rng.randint(20, 190) for _ in range(num_reqs)]
    free = torch.randperm(num_blocks).tolist()
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in lens]
    width = max(map(len, tables))
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    q, k, v = (torch.randn(num_reqs, heads, head_dim) for _ in range(3))
    slots = torch.tensor([t[(n - 1) // block_size] * block_size + (n - 1) % block_size for t, n in zip(tables, lens)])
    return (q, k, v, kc, vc, slots, torch.arange(num_reqs + 1), torch.tensor(lens), bt, head_dim ** -0.5), bt, lens


def prefill_batch(prompts, seed=0, heads=12, head_dim=64, block_size=16, num_blocks=600):
    """(cached, new) per request: new tokens attend the cached ones and each other causally."""
    torch.manual_seed(seed)
    kc, vc = (torch.randn(num_blocks, block_size, heads, head_dim) for _ in range(2))
    free = torch.randperm(num_blocks).tolist()
    tables = [[free.pop() for _ in range(-(-(c + n) // block_size))] for c, n in prompts]
    width = max(map(len, tables))
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    t = sum(n for _, n in prompts)
    q, k, v = (torch.randn(t, heads, head_dim) for _ in range(3))
    slots = torch.tensor([tab[p // block_size] * block_size + p % block_size
                          for tab, (c, n) in zip(tables, prompts) for p in range(c, c + n)])
    qsl = torch.tensor([0] + [n for _, n in prompts]).cumsum(0)
    lens = torch.tensor([c + n for c, n in prompts])
    return q, k, v, kc, vc, slots, qsl, lens, bt, head_dim ** -0.5


def decode_from_dram(attention_cpu):
    """The C decode kernel as in serving: 12 layers' caches (on huge pages), each layer's K/V read
    once per pass, so they come from DRAM (240 MB against a 32 MB L3)."""
    from orca_compile.kernels import hostmem
    batch, _, lens = decode_batch()
    q, _, _, kc, vc, _, qsl, seq_lens, bt, scale = batch
    layers = [tuple(hostmem.empty(c.shape, c.dtype).copy_(c) for c in (kc, vc)) for _ in range(12)]
    out = torch.empty(q.shape[0], q.shape[1], vc.shape[-1])

    def run():
        for k_cache, v_cache in layers:
            attention_cpu.decode_attention(q, k_cache, v_cache, qsl, seq_lens, bt, scale, 0, 0.0, out)

    ms = min(timed(run, reps=5) for _ in range(3))
    nbytes = 12 * sum(lens) * 2 * kc.shape[2] * kc.shape[3] * kc.element_size()
    print(f"  C decode kernel, 12 layers' caches from DRAM: {ms:.2f} ms, {nbytes / ms / 1e6:.1f} GB/s of K/V "
          f"(best of 3)")


def compare_prefills(attention_cpu):
    # as in the engine (runtime/host.py): the op's 1.5 MB outputs are not page-faulted in at every call
    from orca_compile.runtime.host import tune_malloc
    tune_malloc()
    rng = random.Random(0)
    fresh, total = [], 0
    while total < 512:
        n = min(rng.randint(16, 128), 512 - total)
        fresh.append((0, n))
        total += n
    cases = {f"{len(fresh)} fresh prompts, 512 tokens": fresh,
             "4 chunks of 128 tokens on 256-1024 cached": [(256, 128), (512, 128), (768, 128), (1024, 128)]}
    for name, prompts in cases.items():
        batch = prefill_batch(prompts)
        res = {"reference": [], "C kernel": []}
        for _ in range(3):
            res["reference"].append(timed(lambda: ref.attention(*batch), reps=10))
            res["C kernel"].append(timed(lambda: attention_cpu.attention(*batch), reps=10))
        a, b = min(res["reference"]), min(res["C kernel"])
        print(f"  {name}, whole op: reference (SDPA per prompt) {a:.2f} ms, C kernel {b:.2f} ms "
              f"({a / b:.1f}x; best of 3)")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--malloc", action="store_true")
    args = p.parse_args()
    batch, bt, lens = decode_batch()
    kc = batch[3]
    max_len = max(lens)
    nb = -(-max_len // kc.shape[1])
    ids = bt[:, :nb]
    print(f"torch threads {torch.get_num_threads()}; 32 decodes, contexts {min(lens)}-{max(lens)}, per layer:")
    adv = timed(lambda: kc[ids])
    sel = timed(lambda: ref._gather_context(kc, bt, max_len))
    print(f"  gather K of all contexts: advanced indexing {adv:.2f} ms, index_select {sel:.2f} ms ({adv / sel:.1f}x)")

    q, _, _, _, vc, _, _, seq_lens, _, scale = batch
    k_ctx, v_ctx = ref._gather_context(kc, bt, max_len), ref._gather_context(vc, bt, max_len)
    allowed = ref._allowed((seq_lens - 1)[:, None], torch.arange(max_len), seq_lens, 0)
    # softcap=1e9 takes the einsum form (tanh(s / c) * c == s to float32 rounding at this c)
    ein = timed(lambda: ref._attend(q[:, None], k_ctx, v_ctx, allowed, scale, 1e9))
    sdpa = timed(lambda: ref._attend(q[:, None], k_ctx, v_ctx, allowed, scale, 0.0))
    print(f"  attention over the gathered contexts: einsum {ein:.2f} ms, SDPA {sdpa:.2f} ms ({ein / sdpa:.1f}x)")

    buckets = ref._length_buckets
    one = lambda reqs, lens: [sorted(reqs, key=lambda r: -lens[r])] if reqs else []  # noqa: E731
    results = {"one bucket": [], "length buckets": []}
    for _ in range(3):  # interleaved: this machine's speed drifts
        ref._length_buckets = one
        results["one bucket"].append(timed(lambda: ref.attention(*batch)))
        ref._length_buckets = buckets
        results["length buckets"].append(timed(lambda: ref.attention(*batch)))
    a, b = min(results["one bucket"]), min(results["length buckets"])
    print(f"  whole decode op (store + gather + attend): one padded group {a:.2f} ms, length buckets {b:.2f} ms "
          f"({a / b:.2f}x; best of 3)")

    from orca_compile.kernels import attention_cpu

    if attention_cpu.available():
        res = {"reference": [], "C kernel": []}
        for _ in range(3):
            res["reference"].append(timed(lambda: ref.attention(*batch)))
            res["C kernel"].append(timed(lambda: attention_cpu.attention(*batch)))
        a, b = min(res["reference"]), min(res["C kernel"])
        print(f"  whole decode op: reference (length buckets) {a:.2f} ms, C kernel in place over the blocks "
              f"{b:.2f} ms ({a / b:.1f}x; best of 3)")
        decode_from_dram(attention_cpu)
        compare_prefills(attention_cpu)
    else:
        print(f"  C decode kernel not built: {attention_cpu.why_unavailable()}")

    if args.malloc:
        script = ("import orca_compile; from orca_compile import bench; w = bench.WORKLOADS['w1']; "
                  "m = bench.load_model(w.model, dtype=w.dtype); r, _ = bench.run_engine(m, w.requests(50257)); "
                  "print(f'{r.seconds:.2f} {r.extra[\"full_batch_iteration_ms\"]:.1f}')")
        for tune in ("0", "1"):
            env = dict(os.environ, ORCA_TUNE_MALLOC=tune)
            out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
            total, it = out.stdout.split()[-2:]
            print(f"  W1 engine, ORCA_TUNE_MALLOC={tune}: {total} s, full-batch decode iteration {it} ms")


if __name__ == "__main__":
    main()
