"""orca.attention on a GPU: the Triton kernels vs the torch reference vs PyTorch's SDPA on padded batches.

    python benchmarks/attention_kernels.py                       # CUDA: both mixes, bf16, head dim 128
    python benchmarks/attention_kernels.py --sweep               # also time a few tile configurations
    python benchmarks/attention_kernels.py --device cpu --interpret   # tiny smoke run, no GPU needed

Two batches, Llama-3-8B's attention shape by default (32 query heads, 8 KV heads, head dim 128):

* decode-heavy: 64 decodes, contexts drawn uniformly from 128..4096;
* prefill-heavy: 4 fresh prefills of 1024..2048 tokens, 2 chunks of 512 on 1024..3072 cached
  tokens, and 16 decodes.

What is timed (median of ``--repeats`` CUDA-event timings after warm-up):

* ``triton``: ``attention_triton.attention``: the K/V store of the new tokens plus the ragged paged
  attention, one launch each, on the paged cache;
* ``torch-ref``: ``attention_ref.attention``, the same op in plain torch (gathers every context out
  of the paged cache, a dense computation per prefill);
* ``sdpa-padded``: ``F.scaled_dot_product_attention`` on the batch padded to its longest query
  run and longest context (``[B, H, L, D]``, K/V already contiguous, the boolean causal+padding mask
  built outside the timing): what a server without paging or ragged batching would run. Its
  padding, not its kernel, is what it pays for.

Figures: time, effective bandwidth = the KV bytes every request's context needs (each KV head's K
and V of every context position, read once) / time, next to the device's peak measured with a
large device-to-device copy (read + write bytes / time); and TFLOP/s over the causally visible
(query, key) pairs only. The decode mix is bandwidth-bound (compare the bandwidth to the peak),
the prefill mix compute-bound (compare TFLOP/s). Before timing, the Triton result is checked against
the reference computed in float32 on the same inputs, with the tolerance the tests use
(2 u max|v|, u the dtype's unit roundoff); a mismatch exits 1.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _mixes(args, g):
    def rand(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    if args.interpret:  # tiny: the interpreter runs every program in Python
        return {"decode-heavy": [(rand(3, 60), 1) for _ in range(4)],
                "prefill-heavy": [(0, 24), (17, 9), (30, 1)]}
    decode = [(rand(127, 4095), 1) for _ in range(64)]
    prefill = ([(0, rand(1024, 2048)) for _ in range(4)] + [(rand(1024, 3072), 512) for _ in range(2)]
               + [(rand(127, 4095), 1) for _ in range(16)])
    return {"decode-heavy": decode, "prefill-heavy": prefill}


def _build(reqs, nh, nkv, hd, bs, dtype, device, g):
    """Paged cache holding every request's context in scattered blocks, this iteration's q/k/v."""
    tables, used = [], 0
    for cached, new in reqs:
        n = -(-(cached + new) // bs)
        tables.append(list(range(used, used + n)))
        used += n
    perm = torch.randperm(used, generator=g)
    kc = torch.randn(used, bs, nkv, hd, generator=g).to(device=device, dtype=dtype)
    vc = torch.randn(used, bs, nkv, hd, generator=g).to(device=device, dtype=dtype)
    t = sum(n for _, n in reqs)
    q = torch.randn(t, nh, hd, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(t, nkv, hd, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(t, nkv, hd, generator=g).to(device=device, dtype=dtype)
    tables = [perm[tab].tolist() for tab in tables]
    bt = torch.zeros(len(reqs), max(map(len, tables)), dtype=torch.long)
    for r, tab in enumerate(tables):
        bt[r, : len(tab)] = torch.tensor(tab)
    slots = torch.tensor([tables[r][p // bs] * bs + p % bs for r, (c, n) in enumerate(reqs) for p in range(c, c + n)])
    qsl = torch.tensor([0] + [n for _, n in reqs]).cumsum(0)
    seq_lens = torch.tensor([c + n for c, n in reqs])
    meta = [x.to(device) for x in (slots, qsl, seq_lens, bt)]
    return [q, k, v, kc, vc, *meta]


def _padded(args, reqs, nh, nkv):
    """The same batch as SDPA inputs padded to the longest run: q [B, nh, Lq, D], k/v [B, nkv, L, D],
    mask [B, 1, Lq, L] (True: attend), and each request's rows to read the output back from."""
    q, k, v, kc, vc, slots, qsl, seq_lens, bt = args
    from orca_compile.kernels.attention_ref import store_kv

    store_kv(k, v, kc, vc, slots)  # so that the contexts include this iteration's tokens
    bsz, lq = len(reqs), max(n for _, n in reqs)
    lk = -(-max(c + n for c, n in reqs) // 16) * 16  # aligned mask rows, as the efficient kernel wants
    bs = kc.shape[1]
    nblk = -(-lk // bs)
    idx = torch.zeros(bsz, nblk, dtype=bt.dtype, device=bt.device)  # keys past a context: masked
    idx[:, : min(nblk, bt.shape[1])] = bt[:, :nblk].clamp(min=0)
    kp = kc[idx].reshape(bsz, nblk * bs, nkv, -1)[:, :lk].transpose(1, 2).contiguous()
    vp = vc[idx].reshape(bsz, nblk * bs, nkv, -1)[:, :lk].transpose(1, 2).contiguous()
    qp = q.new_zeros(bsz, lq, nh, q.shape[-1])
    mask = torch.zeros(bsz, 1, lq, lk, dtype=torch.bool, device=q.device)
    starts = qsl.tolist()
    for r, (c, n) in enumerate(reqs):
        qp[r, :n] = q[starts[r]: starts[r] + n]
        qpos = torch.arange(c, c + n, device=q.device)[:, None]
        mask[r, 0, :n] = torch.arange(lk, device=q.device)[None] <= qpos
        mask[r, 0, n:, 0] = True  # padding query rows see one key: no all-masked rows (nan)
    return qp.transpose(1, 2).contiguous(), kp, vp, mask


def _sdpa_variant(qp, kp, vp, mask, scale):
    """A callable running SDPA's memory-efficient kernel (the one that takes a mask), and its label.
    GQA natively where this build's kernel supports it, else on K/V expanded to every query head
    (outside the timing; the kernel then reads group-times more K/V). Never the math fallback,
    which would materialise [B, H, Lq, L] scores (tens of GiB for the prefill mix)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(k, v, **kw):
        # the CPU smoke run has no efficient kernel: any backend will do there
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]) if qp.is_cuda else contextlib.nullcontext():
            return F.scaled_dot_product_attention(qp, k, v, attn_mask=mask, scale=scale, **kw)

    try:
        run(kp, vp, enable_gqa=True)
        return (lambda: run(kp, vp, enable_gqa=True)), f"sdpa-padded ({'efficient, ' if qp.is_cuda else ''}gqa)"
    except (RuntimeError, TypeError):
        rep = qp.shape[1] // kp.shape[1]
        ke, ve = kp.repeat_interleave(rep, 1), vp.repeat_interleave(rep, 1)
        return (lambda: run(ke, ve)), f"sdpa-padded ({'efficient, ' if qp.is_cuda else ''}K/V expanded)"


def _time_ms(fn, device, repeats, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _peak_bandwidth(device, repeats):
    """GB/s of a 1 GiB device-to-device copy (bytes read + bytes written)."""
    n = (1 << 30) if device.type == "cuda" else (1 << 26)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), device, repeats)
    return 2 * n / ms / 1e6


def _work(reqs, nh, nkv, hd, elem):
    kv_bytes = sum((c + n) * nkv * 2 * hd * elem for c, n in reqs)
    pairs = sum(n * c + n * (n + 1) // 2 for c, n in reqs)  # visible (query, key) pairs
    flops = 4 * nh * hd * pairs  # QK^T and PV, 2 flops per multiply-add
    return kv_bytes, flops


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--interpret", action="store_true", help="tiny shapes in Triton's interpreter (CPU smoke run)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--sweep", action="store_true", help="also time a few (block_m, block_n, warps, stages)")
    ap.add_argument("--skip-ref", action="store_true", help="do not time the torch reference (slow on prefills)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if args.interpret:
        # before triton is first imported: it jits its own library functions at import
        os.environ["TRITON_INTERPRET"] = "1"
        device = torch.device("cpu")
        args.repeats = min(args.repeats, 3)
    elif device.type == "cuda" and not torch.cuda.is_available():
        print("attention_kernels: no CUDA device here; the Triton kernels need one. "
              "For a CPU smoke run: --device cpu --interpret")
        return 0
    elif device.type != "cuda":
        print(f"attention_kernels: Triton kernels do not run on {device.type} except in the interpreter: "
              "add --interpret for a smoke run")
        return 0
    try:
        from orca_compile.kernels import attention_ref, attention_triton
    except ImportError as e:
        print(f"attention_kernels: cannot import the Triton kernels ({e}); pip install 'orca-compile[triton]'")
        return 0

    dtype = DTYPES[args.dtype]
    nh, nkv, hd, bs = args.heads, args.kv_heads, args.head_dim, args.block_size
    if args.interpret:
        nh, nkv, hd, bs = min(nh, 4), min(nkv, 2), min(hd, 16), min(bs, 4)
    scale = hd ** -0.5
    elem = torch.finfo(dtype).bits // 8
    g = torch.Generator().manual_seed(0)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter: timings meaningless)"
    peak = _peak_bandwidth(device, args.repeats)
    print(f"device: {name}; torch {torch.__version__}; measured copy bandwidth {peak:.0f} GB/s")
    print(f"shape: {nh} query heads, {nkv} KV heads, head dim {hd}, block size {bs}, {args.dtype}")
    failed = False
    for mix, reqs in _mixes(args, g).items():
        inputs = _build(reqs, nh, nkv, hd, bs, dtype, device, g)
        q, k, v, kc, vc, *meta = inputs
        ctx = [c + n for c, n in reqs]
        print(f"\n{mix}: {len(reqs)} requests, {q.shape[0]} new tokens, contexts {min(ctx)}..{max(ctx)} "
              f"(total {sum(ctx)})")

        kc32, vc32 = kc.float(), vc.float()
        ref = attention_ref.attention(q.float(), k.float(), v.float(), kc32, vc32, *meta, scale)
        del kc32, vc32
        qp, kp, vp, mask = _padded(inputs, reqs, nh, nkv)
        sdpa, sdpa_label = _sdpa_variant(qp, kp, vp, mask, scale)
        padded_out = sdpa().transpose(1, 2)  # [B, Lq, nh, D]
        sdpa_out = torch.cat([padded_out[r, :n] for r, (_, n) in enumerate(reqs)])
        # 2 u max|v| (u the unit roundoff), as in tests/kernels; float32: summation order only
        tol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps * float(v.abs().max())
        for label, got in (("triton", attention_triton.attention(*inputs, scale)), ("sdpa-padded", sdpa_out)):
            err = float((got.float() - ref).abs().max())
            ok = err <= tol and bool(torch.isfinite(got).all())
            failed |= not ok
            print(f"  check {label} vs float32 reference: max |err| {err:.2e} (tolerance {tol:.2e}) "
                  f"{'ok' if ok else 'MISMATCH'}")
        del ref, padded_out, sdpa_out

        kv_bytes, flops = _work(reqs, nh, nkv, hd, elem)
        rows = [("triton", lambda: attention_triton.attention(*inputs, scale))]
        if not args.skip_ref:
            rows.append(("torch-ref", lambda: attention_ref.attention(*inputs, scale)))
        rows.append((sdpa_label, sdpa))
        if args.sweep:
            for bm, bn, w, st in [(16, 32, 4, 2), (16, 64, 4, 3), (16, 128, 8, 2), (64, 64, 4, 2),
                                  (64, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3)]:
                kw = dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st)
                rows.append((f"triton m{bm} n{bn} w{w} s{st}",
                             lambda kw=kw: attention_triton.attention(*inputs, scale, **kw)))
        print(f"  {'':38s} {'ms':>9s} {'GB/s':>8s} {'% peak':>7s} {'TFLOP/s':>8s}")
        for label, fn in rows:
            try:
                ms = _time_ms(fn, device, args.repeats)
            except Exception as e:  # one failing variant (e.g. out of shared memory) must not end the run
                print(f"  {label:38s} failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
                continue
            gbs = kv_bytes / ms / 1e6
            print(f"  {label:38s} {ms:9.3f} {gbs:8.0f} {100 * gbs / peak:6.1f}% {flops / ms / 1e9:8.2f}")
        del qp, kp, vp, mask, sdpa, rows
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("\nGB/s: the contexts' K/V bytes (each read once) / time; the decode mix is bound by it. "
          "TFLOP/s: causally visible pairs only; the prefill mix is bound by it.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
