"""The ``orca-compile`` command line."""
from __future__ import annotations

import argparse
import os
import sys

from orca_compile.config import BACKENDS, DEFAULT_BACKEND, DEFAULTS
from orca_compile.dump import FORMATS


def _add_model_args(p):
    p.add_argument("model", nargs="?", default=None,
                   help="a preset (see `orca-compile presets`), a local checkpoint directory, or a hub id "
                        "(default: tiny-llama)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16, float64 (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")


def cmd_dump(args) -> int:
    from orca_compile.presets import DEFAULT_PRESET, load_model

    model = load_model(args.model or DEFAULT_PRESET, dtype=args.dtype, device=args.device)
    world = args.tp * args.pp
    if args.rank is not None and not 0 <= args.rank < world:
        raise ValueError(f"--rank {args.rank} is outside [0, {world}) (--tp {args.tp} x --pp {args.pp})")
    ranks = [args.rank] if args.rank is not None else list(range(world))
    for rank in ranks:  # rank = stage * tp + the rank within the stage
        if len(ranks) > 1:
            print(f"##### rank {rank}: stage {rank // args.tp} of {args.pp}, tensor-parallel rank {rank % args.tp} "
                  f"of {args.tp} " + "#" * 30)
        _dump_rank(args, model, rank, suffix=f"rank{rank}" if len(ranks) > 1 else None)
    return 0


def _dump_rank(args, model, rank, suffix):
    import orca_compile
    from orca_compile import dump

    compiled = orca_compile.compile(model, backend=args.backend, tensor_parallel_size=args.tp, rank=rank % args.tp,
                                    pipeline_parallel_size=args.pp, stage=rank // args.tp)
    if args.stage not in ("all", *compiled.stages):
        raise ValueError(f"no stage {args.stage!r} with backend {compiled.backend}; stages: "
                         f"{', '.join(compiled.stages)}, all")
    stages = list(compiled.stages) if args.stage == "all" else [args.stage]
    print(dump.summary(compiled))
    if args.summary_only:
        return
    for stage in stages:
        gm = compiled.stages[stage]
        text = dump.render(gm, args.format, title=f"{compiled.model_class} — {stage}")
        if args.output:
            path = args.output
            if suffix:
                path = _stage_path(path, suffix)
            if len(stages) > 1:
                path = _stage_path(path, stage)
            with open(path, "w") as f:
                f.write(text)
            print(f"wrote {path} ({stage}, {args.format})")
        else:
            if len(stages) > 1 and args.format in ("text", "table"):
                print(f"=== {stage} " + "=" * 60)
            sys.stdout.write(text)


def _stage_path(path, stage):
    root, ext = os.path.splitext(path)
    return f"{root}.{stage}{ext}"


def _add_backend_arg(p):
    p.add_argument("--backend", default=DEFAULT_BACKEND, choices=list(BACKENDS),
                   help="auto: the C kernels (cpu) on a float32/float64 CPU model where a C compiler is found, "
                        "else oneDNN-lowered linears (float32), else eager")


def _add_engine_args(p):
    from orca_compile.runtime.policy import POLICIES

    g = p.add_argument_group("engine")
    g.add_argument("--max-num-seqs", type=int, default=DEFAULTS.max_num_seqs, help="requests admitted at once")
    g.add_argument("--max-num-batched-tokens", type=int, default=DEFAULTS.max_num_batched_tokens,
                   help="token budget per iteration")
    g.add_argument("--block-size", type=int, default=DEFAULTS.block_size)
    g.add_argument("--num-kv-blocks", type=int, default=DEFAULTS.num_kv_blocks,
                   help="default: max-num-seqs full contexts, memory permitting")
    g.add_argument("--kv-mode", default=DEFAULTS.kv_mode, choices=["paged", "reserve"])
    g.add_argument("--preemption-mode", default=DEFAULTS.preemption_mode, choices=["recompute", "swap"],
                   help="a preempted request's KV: freed and recomputed, or swapped to a host pool and back")
    g.add_argument("--num-host-kv-blocks", type=int, default=DEFAULTS.num_host_kv_blocks,
                   help="the swap pool's blocks (default: as many as the device cache)")
    g.add_argument("--policy", default=DEFAULTS.policy, choices=list(POLICIES), help="scheduling policy")
    g.add_argument("--policy-option", dest="policy_options", action="append", default=[], metavar="KEY=INT",
                   help="a keyword argument of the policy, e.g. mlfq's quantum=16 (repeatable)")
    g.add_argument("--no-chunked-prefill", action="store_true")
    g.add_argument("--tp", "--tensor-parallel-size", dest="tensor_parallel_size", type=int, default=1,
                   help="tensor-parallel ranks, one process each over torch.distributed (gloo on the CPU)")
    g.add_argument("--pp", "--pipeline-parallel-size", dest="pipeline_parallel_size", type=int, default=1,
                   help="pipeline stages (x --tp processes each), with an iteration in flight per stage")
    _add_backend_arg(g)


def _engine_kwargs(args) -> dict:
    return dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                block_size=args.block_size, num_kv_blocks=args.num_kv_blocks, kv_mode=args.kv_mode,
                policy=args.policy, policy_options=_policy_options(args.policy_options),
                preemption_mode=args.preemption_mode, num_host_kv_blocks=args.num_host_kv_blocks,
                chunked_prefill=not args.no_chunked_prefill, backend=args.backend,
                tensor_parallel_size=args.tensor_parallel_size, pipeline_parallel_size=args.pipeline_parallel_size)


def _policies():
    from orca_compile.runtime.policy import POLICIES

    return POLICIES


def _policy_options(items: list[str]) -> dict:
    options = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            if not key:
                raise ValueError
            options[key] = int(value)
        except ValueError:
            raise ValueError(f"--policy-option takes KEY=INTEGER, got {item!r}") from None
    return options


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--prompt-ids takes integers separated by spaces or commas, got {text!r}") from None


def cmd_generate(args) -> int:
    import orca_compile
    from orca_compile import env
    from orca_compile import SamplingParams
    from orca_compile.presets import DEFAULT_PRESET

    prompts = list(args.prompt or []) + [_token_ids(t) for t in args.prompt_ids or []]
    if not prompts:
        raise ValueError("give at least one --prompt TEXT or --prompt-ids '1 2 3'")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos, logprobs=args.logprobs)
    if args.stream and len(prompts) != 1:
        raise ValueError(f"--stream prints one prompt's text as it is generated; got {len(prompts)} prompts")
    kwargs = _engine_kwargs(args)
    launch = env.get()
    if launch.launch_world_size > 1:  # one rank of a torchrun launch
        if kwargs["pipeline_parallel_size"] != 1:
            raise ValueError("under torchrun, generate runs tensor parallel (--tp); pipeline stages run with --pp on "
                             "one machine")
        if kwargs["tensor_parallel_size"] == 1:
            kwargs["tensor_parallel_size"] = launch.launch_world_size
        if launch.launch_rank != 0:  # builds its shard and follows rank 0's engine
            from orca_compile.optimize import model_spec
            from orca_compile.runtime.torchrun_executor import follow

            follow(model_spec(args.model or DEFAULT_PRESET, backend=args.backend, dtype=args.dtype, device=args.device,
                              tensor_parallel_size=kwargs["tensor_parallel_size"]), seed=0)
            return 0
        kwargs["executor"] = "torchrun"
        kwargs.pop("pipeline_parallel_size")
    with orca_compile.optimize(args.model or DEFAULT_PRESET, tokenizer=args.tokenizer, dtype=args.dtype,
                               device=args.device, **kwargs) as engine:
        if args.stream:
            return _stream(engine, prompts[0], params)
        return _generate(engine, prompts, params)


def cmd_serve(args) -> int:
    import orca_compile
    from orca_compile import env
    from orca_compile.presets import DEFAULT_PRESET
    from orca_compile.server import serve

    if env.get().launch_world_size > 1:
        raise ValueError("serve runs in one process: its --tp / --pp ranks are started by the engine, not torchrun")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    model = args.model or DEFAULT_PRESET
    with orca_compile.optimize(model, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device,
                               **_engine_kwargs(args)) as engine:
        serve(engine, args.served_model_name or model, host=args.host, port=args.port)
    return 0


def _generate(engine, prompts, params) -> int:
    def progress(it, outs):  # a live status line where a person waits (a terminal only)
        print(f"\r  iteration {it.iteration}: {it.num_running} running, {it.num_waiting} waiting, "
              f"KV blocks {it.kv_blocks_used}/{engine.config.num_kv_blocks}", end="", file=sys.stderr, flush=True)

    results = engine.generate(prompts, params, on_step=progress if sys.stderr.isatty() else None)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    for i, out in enumerate(results):
        print(f"[{i}] prompt: {prompts[i]!r}")
        if out.text is not None:
            print(f"[{i}] text: {out.text!r}")
        print(f"[{i}] tokens: {out.token_ids}  ({out.finish_reason})")
        if out.logprobs is not None:
            print(f"[{i}] logprobs: {[round(x, 4) for x in out.logprobs]}")
    s = engine.stats()
    print(f"{s['num_generated_tokens']} tokens in {s['num_iterations']} iterations", file=sys.stderr)
    return 0


def _stream(engine, prompt, params) -> int:
    """One prompt's text printed piece by piece as the iterations produce it."""
    if engine.tokenizer is None:
        raise ValueError("--stream prints text, and this model has no tokenizer: pass --tokenizer, or drop "
                         "--stream to see the token ids")
    out = None
    for out in engine.stream(prompt, params):
        print(out.new_text, end="", flush=True)
    print()
    if out.logprobs is not None:
        print(f"logprobs: {[round(x, 4) for x in out.logprobs]}")
    print(f"({len(out.token_ids)} tokens, {out.finish_reason})", file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    from orca_compile.demo import run_demo
    from orca_compile.presets import DEFAULT_PRESET

    run_demo(args.model or DEFAULT_PRESET, num_requests=args.requests, seed=args.seed, dtype=args.dtype or "float32",
             device=args.device, policy=args.policy)
    return 0


def cmd_bench(args) -> int:
    import json

    from orca_compile import bench

    if args.workload in bench.online.SUITES:
        return _bench_online(args)
    systems = tuple(s.strip() for s in args.systems.split(","))
    report = bench.run(args.workload, systems=systems, max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens, backend=args.backend, threads=args.threads,
                       repeat=args.repeat, settle_seconds=args.settle, isolate=args.isolate,
                       tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp, device=args.device,
                       dtype=args.dtype)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def _bench_online(args) -> int:
    import json

    from orca_compile.bench import online

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    ignored = [flag for flag, value, default in (
        ("--systems", args.systems, "engine,hf-static,hf-continuous"), ("--max-num-seqs", args.max_num_seqs, None),
        ("--max-num-batched-tokens", args.max_num_batched_tokens, None), ("--repeat", args.repeat, 1),
        ("--tp", args.tp, 1), ("--pp", args.pp, 1), ("--device", args.device, None),
        ("--dtype", args.dtype, None)) if value != default]
    if ignored:
        raise ValueError(f"bench {args.workload} takes --rates, --requests, --plot-dir, --json, --backend and "
                         f"--threads; not {', '.join(ignored)} (its experiments fix their policies and sizing)")
    try:
        rates = None if args.rates is None else [float(r) for r in args.rates.split(",")]
    except ValueError:
        raise ValueError(f"--rates takes requests per second, comma-separated, got {args.rates!r}") from None
    report = online.run(online.SUITES[args.workload], rates=rates, num_requests=args.requests, backend=args.backend)
    full = {"experiments": report, "comparisons": online.compare(report)}
    if args.json:  # first: a plot that fails loses nothing of the run
        with open(args.json, "w") as f:
            json.dump(full, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot_dir:
        for path in online.plot(report, args.plot_dir):
            print(f"wrote {path}")
    return 0


def cmd_presets(args) -> int:
    from orca_compile.presets import preset_config, preset_names

    for name in preset_names():
        c = preset_config(name)
        print(f"{name:18} {c.model_type:10} layers={c.num_hidden_layers} hidden={c.hidden_size} "
              f"heads={c.num_attention_heads} vocab={c.vocab_size}")
    return 0


def cmd_plan(args) -> int:
    import json

    from orca_compile.passes.partition.planner import Cluster, Workload
    from orca_compile.planning import plan

    cluster = Cluster.load(args.cluster) if args.cluster else None
    workload = Workload(batch_size=args.batch_size, context_len=args.context_len, prefill_tokens=args.prefill_tokens,
                        prompt_len=min(args.prompt_len, args.prefill_tokens))
    bound = args.latency_bound_ms / 1e3 if args.latency_bound_ms else None
    plans = plan(args.model, args.devices, cluster=cluster, objective=args.objective, workload=workload,
                 iteration=args.iteration, latency_bound=bound, dtype=args.dtype)
    if args.json:
        print(json.dumps({"model": args.model, "cluster": cluster.name if cluster else "this machine",
                          "devices": args.devices, "objective": args.objective, "iteration": args.iteration,
                          "latency_bound_seconds": bound, "plans": [p.to_dict() for p in plans]}, indent=2))
        return 0
    where = f"{cluster.name or args.cluster} ({cluster.nodes} x {cluster.devices_per_node})" if cluster else \
        "this machine (measured)"
    print(f"{args.model} on {args.devices} devices of {where}; objective: {args.objective} on the {args.iteration} "
          f"iteration of {workload.batch_size} requests x {workload.context_len} tokens"
          + (f", per-token latency <= {args.latency_bound_ms:g} ms" if bound else ""))
    best = plans[0]
    print(f"chosen:  {best.describe()}")
    for s, mem in enumerate(best.memory_bytes):
        print(f"  stage {s}: layers {best.cuts[s]}-{best.cuts[s + 1] - 1}, "
              f"{best.stage_seconds[args.iteration][s] * 1e3:.3g} ms, {mem['weights'] / 2**30:.3g} GiB weights + "
              f"{mem['kv_cache'] / 2**30:.3g} GiB KV per rank (limit {best.memory_limit_bytes / 2**30:.3g} GiB)")
    if best.replicated:
        print(f"  kept whole on every rank: {len(best.replicated)} blocks, e.g. {best.replicated[:4]}")
    for p in plans[1:args.top]:
        print(f"runner-up: {p.describe()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from orca_compile.passes.lower_cpu import pipeline
    from orca_compile.passes.manager import STAGES

    LOWERING_STAGES = [stage for stage, _ in pipeline("orca") if stage not in STAGES]

    parser = argparse.ArgumentParser(prog="orca-compile", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log what the compiler and the engine decide (backend, fallbacks) to stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("dump", help="compile a model and print its graph after each rewrite stage")
    _add_model_args(p)
    _add_backend_arg(p)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks of a split (within each stage)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages of a split")
    p.add_argument("--rank", type=int, default=None,
                   help="show this rank's graph (rank = stage * tp + its rank in the stage); default: every rank")
    p.add_argument("--stage", default="final",
                   choices=[*STAGES, "pipelined", "partitioned", *LOWERING_STAGES, "all"],
                   help="lowered: the graph the engine runs on this machine; linears, attention, norms, rope: "
                        "the cpu lowering's own stages; all: every stage the backend has")
    p.add_argument("--format", default="text", choices=FORMATS)
    p.add_argument("-o", "--output", default=None, help="write the graph here (with --stage all: one file per stage)")
    p.add_argument("--summary-only", action="store_true", help="print the per-stage op counts only")
    p.set_defaults(func=cmd_dump)
    p = sub.add_parser("generate", help="compile a model and generate for some prompts")
    _add_model_args(p)
    p.add_argument("--prompt", action="append", help="a text prompt (needs a tokenizer); repeat for more")
    p.add_argument("--prompt-ids", action="append", help="a prompt as token ids, e.g. '1 2 3'; repeat for more")
    p.add_argument("--tokenizer", default=None, help="tokenizer name or path (default: the checkpoint's)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--logprobs", action="store_true")
    p.add_argument("--stream", action="store_true", help="print one prompt's text as it is generated")
    _add_engine_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="serve a model over HTTP (OpenAI-compatible completions and chats)")
    _add_model_args(p)
    p.add_argument("--tokenizer", default=None, help="tokenizer name or path (default: the checkpoint's)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the name requests give as model (default: MODEL)")
    _add_engine_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="compile the default model and serve staggered requests with a live view")
    _add_model_args(p)
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policy", default=DEFAULTS.policy, choices=list(_policies()),
                   help="scheduling policy (priority: each request gets a random priority 0-3)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="serving benchmark: the engine against HF baselines in the same run")
    p.add_argument("workload", nargs="?", default="w1",
                   help="w1 (GPT-2-small shape, issue 3), w1-moe (W1's requests, Mixtral-shaped) or w1-tiny; "
                        "orca: online serving under the static, fcfs and mlfq policies, Poisson arrivals at several "
                        "rates (Orca's and FastServe's experiments, docs/benchmarks.md); orca-tiny: the same in seconds")
    p.add_argument("--systems", default="engine,hf-static,hf-continuous")
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: the workload's")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: the workload's")
    p.add_argument("--backend", default=DEFAULT_BACKEND, choices=list(BACKENDS), help="the engine system's backend")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds of all the systems, the order reversed every other round; medians are reported")
    p.add_argument("--settle", type=int, default=5, metavar="SECONDS",
                   help="before each timed run, wait until the host has left the CPUs alone this long "
                        "(CPU steal under 1%%; 0: do not wait)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                   help="each system in a process of its own (default), so none runs under another's "
                        "process-wide settings such as the engine's malloc tuning")
    p.add_argument("--tp", type=int, default=1, help="the engine system's tensor-parallel ranks (a process each)")
    p.add_argument("--pp", type=int, default=1, help="the engine system's pipeline stages (a process each)")
    p.add_argument("--device", default=None, help="where every system runs, e.g. cuda (default: the CPU)")
    p.add_argument("--dtype", default=None, help="the workload's model in this dtype, e.g. bfloat16 on a GPU "
                                                 "(default: the workload's)")
    p.add_argument("--json", default=None, help="also write the report here")
    p.add_argument("--rates", default=None, help="orca: arrival rates in requests/s, comma-separated "
                                                 "(default: each experiment's)")
    p.add_argument("--requests", type=int, default=None, help="orca: requests per point (default: each experiment's)")
    p.add_argument("--plot-dir", default=None, help="orca: write PNG plots here (needs matplotlib)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("plan", help="choose tp x pp, the stage cuts and what to shard, for a device count "
                                    "(from the config alone: no weights are loaded)")
    p.add_argument("model", help="preset, config.json, a directory holding one, or hub id")
    p.add_argument("--devices", type=int, required=True)
    p.add_argument("--cluster", default=None, help="a cluster JSON file (examples/clusters/); default: this machine, "
                                                   "measured, one process per device")
    p.add_argument("--objective", default="latency", choices=["latency", "throughput"],
                   help="latency: the fastest iteration; throughput: the most tokens/s with pp iterations in flight")
    p.add_argument("--iteration", default="decode", choices=["decode", "prefill"],
                   help="the iteration the objective is measured on")
    p.add_argument("--latency-bound-ms", type=float, default=None, help="throughput: the per-token latency limit")
    p.add_argument("--batch-size", type=int, default=32, help="requests decoding together (their KV must fit)")
    p.add_argument("--context-len", type=int, default=1024, help="tokens each request holds")
    p.add_argument("--prefill-tokens", type=int, default=2048, help="new tokens of a prefill iteration")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--dtype", default=None, help="default: the config's, else float32")
    p.add_argument("--top", type=int, default=6, help="plans to print")
    p.add_argument("--json", action="store_true", help="every plan as JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("presets", help="list the built-in tiny models")
    p.set_defaults(func=cmd_presets)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        from orca_compile import env

        env.configure_logging("INFO")
    try:
        return args.func(args)
    except (ValueError, RuntimeError, OSError) as exc:  # OSError: a checkpoint or hub id not found
        print(f"orca-compile: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
