"""The ``orca-compile`` command line."""
from __future__ import annotations

import argparse
import os
import sys

from orca_compile.dump import FORMATS


def _add_model_args(p):
    p.add_argument("model", nargs="?", default=None,
                   help="a preset (see `orca-compile presets`), a local checkpoint directory, or a hub id "
                        "(default: tiny-llama)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16, float64 (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")


def cmd_dump(args) -> int:
    import orca_compile
    from orca_compile import dump
    from orca_compile.passes.manager import STAGES
    from orca_compile.presets import DEFAULT_PRESET, load_model

    model = load_model(args.model or DEFAULT_PRESET, dtype=args.dtype, device=args.device)
    compiled = orca_compile.compile(model)
    stages = list(STAGES) if args.stage == "all" else [args.stage]
    print(dump.summary(compiled))
    if args.summary_only:
        return 0
    for stage in stages:
        gm = compiled.stages[stage]
        text = dump.render(gm, args.format, title=f"{compiled.model_class} — {stage}")
        if args.output:
            path = _stage_path(args.output, stage) if len(stages) > 1 else args.output
            with open(path, "w") as f:
                f.write(text)
            print(f"wrote {path} ({stage}, {args.format})")
        else:
            if len(stages) > 1 and args.format in ("text", "table"):
                print(f"=== {stage} " + "=" * 60)
            sys.stdout.write(text)
    return 0


def _stage_path(path, stage):
    root, ext = os.path.splitext(path)
    return f"{root}.{stage}{ext}"


def cmd_presets(args) -> int:
    from orca_compile.presets import preset_config, preset_names

    for name in preset_names():
        c = preset_config(name)
        print(f"{name:18} {c.model_type:10} layers={c.num_hidden_layers} hidden={c.hidden_size} "
              f"heads={c.num_attention_heads} vocab={c.vocab_size}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from orca_compile.passes.manager import STAGES

    parser = argparse.ArgumentParser(prog="orca-compile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("dump", help="compile a model and print its graph after each rewrite stage")
    _add_model_args(p)
    p.add_argument("--stage", default="final", choices=[*STAGES, "all"])
    p.add_argument("--format", default="text", choices=FORMATS)
    p.add_argument("-o", "--output", default=None, help="write the graph here (with --stage all: one file per stage)")
    p.add_argument("--summary-only", action="store_true", help="print the per-stage op counts only")
    p.set_defaults(func=cmd_dump)
    p = sub.add_parser("presets", help="list the built-in tiny models")
    p.set_defaults(func=cmd_presets)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, OSError) as exc:  # OSError: a checkpoint or hub id not found
        print(f"orca-compile: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
