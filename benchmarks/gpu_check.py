"""The engine's CUDA path, proved in one short run on a lent GPU (issue 19); ``--dry-run`` here.

    python3 benchmarks/gpu_check.py OUT               # on a GPU machine: 7.5 minutes at most
    python3 benchmarks/gpu_check.py --dry-run OUT     # anywhere: the same script at CPU sizes (CI)
    make gpu-check OUT=dir  /  make gpu-check ARGS=--dry-run

A GPU is lent now and then for about 15 minutes, so what it must show is prepared here and runs in
one process tree under one deadline (``--deadline``, default 450 s; the tool that launches it
allows 600). Sections, in order of what they prove:

``environment``  versions, the device, whether Triton compiles (not interprets) there.
``kernels``      tests/kernels/test_attention_triton.py compiled for the GPU, with the serving
                 shapes that are skipped on a CPU (dry run: a few cases in Triton's interpreter).
``end_to_end``   tests/acceptance/test_cuda.py: the engine against HF ``generate`` on the same
                 device, float32 and bfloat16, staggered arrivals and KV pressure (dry run: on
                 the CPU, one case; the whole module runs in the test suite).
``attention``    decode- and prefill-heavy batches of ``orca.attention`` (Llama-3-8B heads,
                 bfloat16) timed against the bytes and FLOPs they must move, as fractions of the
                 device's copy bandwidth and bfloat16 matmul rate measured in the same run (dry
                 run: tiny shapes on the CPU, Triton's interpreter, the torch reference timed).
``w1``, ``w2``   the serving workloads (docs/benchmarks.md) on the GPU in bfloat16: the engine
                 against HF continuous batching on the same device, same run (dry run: w1-smoke
                 and w2-tiny, 8 short requests each, on the CPU against HF static batching, which
                 sets up in a second where HF's continuous batching takes ten).

Each section runs in a child process (pytest for the two test sections, this script with
``--section`` for the others) in a process group of its own, killed at its budget or at the
deadline, so a hang, a CUDA fault or an out-of-memory in one costs that section alone. After each
section the report is written again: ``OUT/report.json`` (every section's status ``pass``,
``fail``, ``error``, ``timeout`` or ``skip``, its seconds, figures and any traceback) and
``OUT/summary.txt`` (a line per section); pytest's JUnit XML and log go beside them
(``kernels-junit.xml``, ``kernels.log``, ``end_to_end-junit.xml``, ``end_to_end.log``), the other
sections' output to ``sections.log``: seven files, under the tool's eight. The exit status is 0
when no section failed, errored or timed out (skips are not failures).

It needs only what such a machine has (torch, triton, transformers, numpy, pytest) and this
package installed without its dependencies: ``pip install --no-deps --no-build-isolation -e .``, or,
where that pip refuses (an externally managed Python, no setuptools), nothing: the checkout is
then imported through links (``_importable``), so run the two with ``;`` between them, not ``&&``.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DEADLINE = 450.0
REPORT_VERSION = 1
STATUSES = ("pass", "fail", "error", "timeout", "skip")
LOG_TAIL = 4000  # characters of a failing section's output kept in the report


@dataclasses.dataclass(frozen=True)
class Section:
    name: str
    budget: float  # seconds on a GPU; the deadline may leave less
    dry_budget: float  # seconds in a dry run
    kind: str  # "pytest" or "child"
    what: str


# the GPU budgets sum to 440 s, under the default deadline: every section gets its turn
SECTIONS = (
    Section("environment", 30, 60, "child", "versions, the device, Triton compiled or interpreted"),
    Section("kernels", 110, 90, "pytest", "Triton attention and K/V store against the reference, compiled for the GPU"),
    Section("end_to_end", 80, 90, "pytest", "the engine against HF generate on the same device, float32 and bfloat16"),
    Section("attention", 40, 60, "child", "attention time against the bytes and FLOPs it must move"),
    Section("w1", 80, 90, "child", "W1: the engine against HF continuous batching on the same GPU, bfloat16"),
    Section("w2", 100, 90, "child", "W2: a bfloat16 checkpoint, the engine against HF continuous batching"),
)
BY_NAME = {s.name: s for s in SECTIONS}

# what the pytest sections run; the dry run takes a few fast cases of each (the whole of
# test_cuda.py runs in the ordinary test suite anyway)
PYTEST = {
    "kernels": (["tests/kernels/test_attention_triton.py"],
                "decode_only_and_prefill_only or store_kv_skips or backend_choice or op_runs_the_chosen_backend"),
    "end_to_end": (["tests/acceptance/test_cuda.py"],
                   "devices_kernels or (float32 and kv_pressure)"),
}
# serving sections: (workload, systems, dtype) on a GPU and in a dry run
SERVING = {
    "w1": {"gpu": ("w1", ("engine", "hf-continuous"), "bfloat16"),
           "dry": ("w1-smoke", ("engine", "hf-static"), None)},
    "w2": {"gpu": ("w2", ("engine", "hf-continuous"), None),  # the checkpoint's own dtype: bfloat16
           # the bfloat16 checkpoint read by path, in float32: 16-bit matmuls are slow on this CPU
           "dry": ("w2-tiny", ("engine", "hf-static"), "float32")},
}


# ------------------------------------------------------------------------------------ the parent

def main(argv=None) -> int:
    args = _parse(argv)
    if args.section:
        return _child(args)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [s.name for s in SECTIONS] if not args.sections else args.sections.split(",")
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise SystemExit(f"gpu_check: unknown section {unknown[0]!r}; one of {', '.join(BY_NAME)}")
    if args.deadline <= 0:
        raise SystemExit(f"gpu_check: --deadline must be > 0 seconds, got {args.deadline}")
    report = _new_report(args, names)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as parts:
        report["package"] = _importable(pathlib.Path(parts))
        for name in names:
            section = BY_NAME[name]
            left = args.deadline - (time.monotonic() - start)
            budget = min(section.dry_budget if args.dry_run else section.budget, left - 2)
            if budget < 5:
                result = _result("timeout", 0.0, budget, f"not started: {left:.0f} s left of the deadline")
            elif not args.dry_run and report["device"].get("cuda") is False:
                result = _result("skip", 0.0, budget, "no CUDA device (see environment); --dry-run runs here")
            else:
                result = _run_section(section, args, out, pathlib.Path(parts), budget)
            report["sections"][name] = result
            if name == "environment" and result.get("details"):
                report["device"] = result["details"].get("device", {})
            report["elapsed_s"] = round(time.monotonic() - start, 1)
            _write(out, report)  # after every section: a later one's crash loses nothing
            print(_line(name, result), flush=True)
    report["finished"] = _now()
    report["ok"] = not any(r["status"] in ("fail", "error", "timeout") for r in report["sections"].values())
    _write(out, report)
    print(f"gpu_check: {'ok' if report['ok'] else 'FAILED'} in {report['elapsed_s']} s; report in {out}/report.json")
    return 0 if report["ok"] else 1


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="folder for report.json, summary.txt and the logs (created)")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: every section at CPU sizes")
    ap.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE, help="seconds for the whole run")
    ap.add_argument("--sections", default="", help=f"comma-separated subset of {', '.join(BY_NAME)}")
    ap.add_argument("--section", default="", help=argparse.SUPPRESS)  # a child: run this one section
    ap.add_argument("--part", default="", help=argparse.SUPPRESS)  # where the child writes its result
    return ap.parse_args(argv)


def _new_report(args, names) -> dict:
    return {"version": REPORT_VERSION, "script": "benchmarks/gpu_check.py",
            "mode": "dry-run" if args.dry_run else "gpu", "started": _now(), "finished": None,
            "deadline_s": args.deadline, "elapsed_s": 0.0, "ok": None,
            "argv": sys.argv[1:], "python": sys.version.split()[0], "device": {},
            "about": {n: BY_NAME[n].what for n in names},
            "sections": {n: _result("skip", 0.0, 0.0, "not reached") for n in names}}


def _result(status, seconds, budget, summary, details=None, tb=None, log=None) -> dict:
    assert status in STATUSES, status
    return {"status": status, "seconds": round(seconds, 1), "budget_s": round(max(budget, 0.0), 1), "summary": summary,
            "details": details or {}, "traceback": tb, "log": log}


# where each package of the project lies in the checkout (pyproject.toml's package-dir)
PACKAGE_DIRS = {"": "orca_compile", "passes": "passes", "runtime": "runtime", "kernels": "kernels"}


def _importable(scratch: pathlib.Path) -> str:
    """Make ``orca_compile`` importable by the sections' processes: as installed (``pip install
    --no-deps -e .``), or else from this checkout through a tree of links laid out as
    pyproject.toml's ``package-dir`` maps it, put first on ``PYTHONPATH``; so a GPU machine whose
    pip refuses the install (an externally managed Python, no setuptools) still runs the check."""
    probe = [sys.executable, "-c", "import orca_compile, orca_compile.passes, orca_compile.runtime"]
    if subprocess.run(probe, cwd=scratch, capture_output=True, timeout=120).returncode == 0:
        return "installed"
    root = link_tree(scratch / "shim")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.fspath(root), os.environ.get("PYTHONPATH")]))
    if subprocess.run(probe, cwd=scratch, capture_output=True, timeout=120).returncode != 0:
        return "not importable (neither installed nor from the checkout)"
    return f"from the checkout ({root}: the package was not installed)"


def link_tree(root: pathlib.Path) -> pathlib.Path:
    """``root/orca_compile``: links to this checkout's files, its subpackages where PACKAGE_DIRS
    puts them; ``root`` on ``PYTHONPATH`` imports the checkout."""
    shim = root / "orca_compile"
    shim.mkdir(parents=True)
    for entry in (ROOT / "orca_compile").iterdir():
        (shim / entry.name).symlink_to(entry)
    for sub, folder in PACKAGE_DIRS.items():
        if sub:
            (shim / sub).symlink_to(ROOT / folder)
    return root


def _run_section(section, args, out, parts, budget) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # the package: installed, or from _importable's links
    if args.dry_run and section.name == "attention":
        env["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernels run in its interpreter
    elif not args.dry_run:
        env.pop("TRITON_INTERPRET", None)  # compiled, on the GPU
        env["ORCA_VERIFY_PASSES"] = "0"  # the suite re-checks every rewrite on fake tensors; CI does that here
    if section.kind == "pytest":
        files, subset = PYTEST[section.name]
        log = out / f"{section.name}.log"
        junit = out / f"{section.name}-junit.xml"
        cmd = [sys.executable, "-m", "pytest", *files, "-v", "-rA", "-p", "no:cacheprovider",
               "-o", "junit_family=xunit1", f"--junitxml={junit}"] + (["-k", subset] if args.dry_run else [])
    else:
        log = out / "sections.log"
        part = parts / f"{section.name}.json"
        cmd = [sys.executable, os.fspath(pathlib.Path(__file__).resolve()), "--section", section.name,
               "--part", os.fspath(part), os.fspath(out)] + (["--dry-run"] if args.dry_run else [])
    t0 = time.monotonic()
    with open(log, "a") as f:
        f.write(f"\n===== {section.name}: {' '.join(cmd)}\n")
        f.flush()
        offset = f.tell()
        rc, timed_out = _run(cmd, f, env, budget)
    seconds = time.monotonic() - t0
    text = log.read_bytes()[offset:].decode(errors="replace")
    if section.kind == "pytest":
        return _pytest_result(text, junit, rc, timed_out, seconds, budget, log.name)
    if timed_out:
        return _result("timeout", seconds, budget, f"killed at its budget of {budget:.0f} s", log=log.name,
                       tb=text[-LOG_TAIL:])
    try:
        res = json.loads(part.read_text())
    except (OSError, ValueError):
        return _result("error", seconds, budget, f"the section's process exited {rc} without a result",
                       tb=text[-LOG_TAIL:], log=log.name)
    return _result(res["status"], seconds, budget, res["summary"], res.get("details"), res.get("traceback"),
                   log.name)


def _run(cmd, logfile, env, budget) -> tuple[int, bool]:
    """Run ``cmd`` in a process group of its own (its children too: pytest's subprocesses, the
    engine's workers), output to ``logfile``; the whole group is killed at ``budget`` seconds."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logfile, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        return proc.wait(timeout=budget), False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return proc.returncode, True


def _pytest_result(text, junit, rc, timed_out, seconds, budget, log) -> dict:
    """A pytest section's result from its JUnit XML (counts, each test's recorded properties,
    failures' messages), or, when it was killed before writing one, from its ``-v`` lines."""
    details = {"junit": junit.name, "tests": {}}
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    if junit.exists() and not timed_out:
        for case in ET.parse(junit).getroot().iter("testcase"):
            name = case.get("name")
            entry = {"seconds": float(case.get("time", 0))}
            props = {p.get("name"): _number(p.get("value")) for p in case.iter("property")}
            if props:
                entry["properties"] = props
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            if bad is not None:
                entry["status"] = "failed" if bad.tag == "failure" else "error"
                entry["message"] = (bad.get("message") or "")[:500]
            elif case.find("skipped") is not None:
                entry["status"] = "skipped"
                entry["message"] = (case.find("skipped").get("message") or "")[:200]
            else:
                entry["status"] = "passed"
            counts[{"error": "errors"}.get(entry["status"], entry["status"])] += 1
            details["tests"][name] = entry
    else:  # killed: what -v printed so far
        for line in text.splitlines():
            for word, key in (("PASSED", "passed"), ("FAILED", "failed"), ("SKIPPED", "skipped"), ("ERROR", "errors")):
                if "::" in line and f" {word}" in line and not line.startswith(word):
                    counts[key] += 1
                    details["tests"][line.split()[0]] = {"status": key}
                    break
    details["counts"] = counts
    summary = ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "no tests ran"
    if timed_out:
        return _result("timeout", seconds, budget, f"killed at {budget:.0f} s after {summary}", details,
                       text[-LOG_TAIL:], log)
    if counts["failed"] or counts["errors"] or rc not in (0, 5):
        return _result("fail", seconds, budget, f"{summary} (pytest exit {rc})", details, text[-LOG_TAIL:], log)
    if not counts["passed"]:
        return _result("skip", seconds, budget, summary, details, None, log)
    return _result("pass", seconds, budget, summary, details, None, log)


def _number(text):
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except (TypeError, ValueError):
        return text


def _write(out, report) -> None:
    """report.json and summary.txt, each replaced whole (never half-written)."""
    for name, text in (("report.json", json.dumps(report, indent=2, default=str)), ("summary.txt", _summary(report))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


def _summary(report) -> str:
    dev = report.get("device") or {}
    head = [f"gpu_check ({report['mode']}) started {report['started']}, {report['elapsed_s']} s of "
            f"{report['deadline_s']:.0f}; ok: {report['ok']}",
            f"device: {dev.get('name', '?')}; torch {dev.get('torch', '?')}, triton {dev.get('triton', '?')}, "
            f"transformers {dev.get('transformers', '?')}"]
    lines = []
    for name, res in report["sections"].items():
        lines.append(_line(name, res))
        lines += [f"    {x}" for x in res["details"].get("headline", [])]
    return "\n".join(head + lines) + "\n"


def _line(name, res) -> str:
    return f"{name:12s} {res['status']:8s} {res['seconds']:7.1f} s  {res['summary']}"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------- a child

def _child(args) -> int:
    """One section in this process: its result (status, summary, details, traceback) to ``--part``."""
    fn = {"environment": environment, "attention": attention, "w1": serving, "w2": serving}[args.section]
    try:
        status, summary, details = fn(args)
        res = {"status": status, "summary": summary, "details": details}
    except Exception as exc:
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        res = {"status": "error", "summary": f"{type(exc).__name__}: {first}", "details": {},
               "traceback": traceback.format_exc()}
        print(res["traceback"], file=sys.stderr)
    pathlib.Path(args.part).write_text(json.dumps(res, default=str))
    return 0


def environment(args):
    import torch

    dev = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda": torch.cuda.is_available(),
           "python": sys.version.split()[0]}
    for mod in ("triton", "transformers", "numpy"):
        try:
            dev[mod] = __import__(mod).__version__
        except Exception as exc:  # a missing package is a finding, not a crash
            dev[mod] = f"missing ({type(exc).__name__})"
    import orca_compile
    from orca_compile.kernels import dispatch

    dev["orca_compile"] = os.fspath(pathlib.Path(orca_compile.__file__).parent)
    if dev["cuda"]:
        props = torch.cuda.get_device_properties(0)
        dev |= {"name": props.name, "capability": f"{props.major}.{props.minor}",
                "memory_gib": round(props.total_memory / 2 ** 30, 1), "multiprocessors": props.multi_processor_count,
                "device_count": torch.cuda.device_count()}
    else:
        dev["name"] = "CPU (no CUDA device)"
    dev["attention_backend"] = {str(dt).removeprefix("torch."): dispatch.attention_backend(
        "cuda" if dev["cuda"] else "cpu", dt) for dt in (torch.float32, torch.bfloat16)}
    details = {"device": dev, "git_commit": _git_commit(),
               "headline": [f"{dev['name']}, torch {dev['torch']}, triton {dev['triton']}, "
                            f"attention {dev['attention_backend']}"]}
    if args.dry_run:
        return "pass", f"{dev['name']}; torch {dev['torch']}", details
    if not dev["cuda"]:
        return "fail", "no CUDA device: the GPU sections cannot run (--dry-run runs here)", details
    if dev["attention_backend"]["bfloat16"] != "triton":
        return "fail", f"orca.attention would not run Triton on the GPU: {dev['attention_backend']}", details
    return "pass", f"{dev['name']} (sm {dev['capability']}, {dev['memory_gib']} GiB); torch {dev['torch']}", details


def _git_commit() -> str | None:
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return res.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None  # the tree travelled without its .git, or no git there


def attention(args):
    """Decode- and prefill-heavy batches of ``orca.attention`` (benchmarks/attention_kernels.py's
    mixes and inputs), checked against the float32 reference, then timed; each figure is set
    against this run's copy bandwidth (decode: bound by the K/V bytes) and bfloat16 matmul rate
    (prefill: bound by the FLOPs of the causally visible pairs)."""
    import types

    import torch

    ak = _attention_kernels()
    dry = args.dry_run
    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.bfloat16
    repeats = 3 if dry else 20
    shape = (4, 2, 16, 4) if dry else (32, 8, 128, 16)  # query heads, KV heads, head dim, block size
    copy_gbs = ak._peak_bandwidth(device, repeats)
    matmul_tflops = _matmul_tflops(ak, device, dtype, 256 if dry else 8192, repeats)
    g = torch.Generator().manual_seed(0)
    mixes = {}
    for mix, reqs in ak._mixes(types.SimpleNamespace(interpret=dry), g).items():
        mixes[mix] = row = _time_mix(ak, reqs, shape, dtype, device, g, repeats, with_ref=dry)
        row["of_copy_bandwidth"] = row["gb_per_s"] / copy_gbs
        row["of_matmul_rate"] = row["tflop_per_s"] / matmul_tflops
        if device.type == "cuda":
            torch.cuda.empty_cache()
    nh, nkv, hd, bs = shape
    details = {"device": str(device), "dtype": "bfloat16", "heads": [nh, nkv, hd], "block_size": bs,
               "copy_gb_per_s": copy_gbs, "matmul_tflop_per_s": matmul_tflops, "mixes": mixes,
               "note": "copy bandwidth counts bytes read + written; GB/s counts each context's K/V read once; "
                       "TFLOP/s counts causally visible pairs only" + ("; dry run: interpreter timings are "
                                                                       "meaningless" if dry else "")}
    dec, pre = mixes["decode-heavy"], mixes["prefill-heavy"]
    details["headline"] = [
        f"copy {copy_gbs:.0f} GB/s, bf16 matmul {matmul_tflops:.1f} TFLOP/s",
        f"decode-heavy {dec['triton_ms']:.3f} ms: {dec['gb_per_s']:.0f} GB/s = {dec['of_copy_bandwidth']:.0%} of copy",
        f"prefill-heavy {pre['triton_ms']:.3f} ms: {pre['tflop_per_s']:.1f} TFLOP/s = "
        f"{pre['of_matmul_rate']:.0%} of matmul"]
    summary = "; ".join(details["headline"][1:])
    if not all(row["ok"] for row in mixes.values()):
        return "fail", "Triton differs from the float32 reference beyond 2 u max|v|: " + summary, details
    return "pass", summary, details


def _attention_kernels():
    """benchmarks/attention_kernels.py as a module: its mixes, inputs, timer and work counts."""
    sys.path.insert(0, os.fspath(ROOT / "benchmarks"))
    import attention_kernels

    return attention_kernels


def _matmul_tflops(ak, device, dtype, n, repeats) -> float:
    """The device's dense matmul rate in ``dtype`` (TFLOP/s), an ``n``-cubed product timed as the
    kernels are (CUDA events on a GPU)."""
    import torch

    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty_like(a)
    return 2 * n ** 3 / ak._time_ms(lambda: torch.mm(a, b, out=c), device, repeats) / 1e9


def _time_mix(ak, reqs, shape, dtype, device, g, repeats, with_ref) -> dict:
    """One mix: Triton against the float32 reference (the tests' tolerance, 2 u max|v|), then its
    time and the K/V bytes and FLOPs it must move; ``with_ref``: the torch reference timed too."""
    import torch

    from orca_compile.kernels import attention_ref, attention_triton

    nh, nkv, hd, bs = shape
    scale = hd ** -0.5
    inputs = ak._build(reqs, nh, nkv, hd, bs, dtype, device, g)
    q, k, v, kc, vc, *meta = inputs
    ref = attention_ref.attention(q.float(), k.float(), v.float(), kc.float(), vc.float(), *meta, scale)
    err = float((attention_triton.attention(*inputs, scale).float() - ref).abs().max())
    tol = torch.finfo(dtype).eps * float(v.abs().max())
    kv_bytes, flops = ak._work(reqs, nh, nkv, hd, torch.finfo(dtype).bits // 8)
    ms = ak._time_ms(lambda: attention_triton.attention(*inputs, scale), device, repeats)
    row = {"requests": len(reqs), "new_tokens": int(q.shape[0]), "context_tokens": sum(c + n for c, n in reqs),
           "max_abs_err": err, "tolerance": tol, "ok": err <= tol, "triton_ms": ms, "kv_bytes": kv_bytes,
           "flops": flops, "gb_per_s": kv_bytes / ms / 1e6, "tflop_per_s": flops / ms / 1e9}
    if with_ref:  # the timing code on the CPU: the torch reference beside the interpreter
        row["torch_ref_ms"] = ak._time_ms(lambda: attention_ref.attention(*inputs, scale), device, repeats)
    return row


def serving(args):
    """A serving workload through ``orca_compile.bench.run`` on the device, every system in this
    process (``isolate=False``: one GPU, one model object), one round; the report's figures."""
    from orca_compile import bench

    mode = "dry" if args.dry_run else "gpu"
    workload, systems, dtype = SERVING[args.section][mode]
    lines = []

    def run(which):
        return bench.run(workload, systems=which, device=None if args.dry_run else "cuda", dtype=dtype,
                         settle_seconds=0, isolate=False, log=lambda line: (lines.append(line), print(line, flush=True)))

    try:
        report = run(systems)
    except Exception as exc:  # HF's continuous batching differs between releases: keep the engine's figures
        if args.dry_run:
            raise
        failed = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        report = run(systems[:1])
        engine = report["results"][0]
        return "fail", f"{systems[1]} failed ({failed}); engine alone {engine['tokens_per_second']:.0f} tok/s", {
            "workload": workload, "error": failed, "traceback": traceback.format_exc(), "log": lines,
            "results": {engine["system"]: {k: engine[k] for k in ("seconds", "tokens_per_second", "useful_tokens")}
                        | {k: engine["extra"].get(k) for k in ("decode_iteration_ms", "streamed_weight_bytes")}}}
    other = systems[1]
    res = {r["system"]: r for r in report["results"]}
    engine = report["results"][0]
    details = {"workload": workload, "systems": list(systems), "dtype": dtype or report["workload"]["dtype"]
               or report["workload"]["checkpoint_dtype"], "device": report.get("device", "cpu"),
               "speedup": report.get(f"speedup_over_{other}"), "same_tokens": report.get(f"same_tokens_as_{other}"),
               "compute_floor_s": report["compute_floor_s"], "engine_over_floor": report.get("engine_over_floor"),
               "matmul_rate": report["matmul_rate"], "read_bandwidth": report["read_bandwidth_before"],
               "results": {name: {k: r[k] for k in ("seconds", "tokens_per_second", "useful_tokens", "setup_seconds")}
                           | {k: r["extra"][k] for k in ("decode_iteration_ms", "decode_batch_median", "iterations",
                                                        "forward_share", "full_batch_iteration_ms",
                                                        "overhead_breakdown_ms", "streamed_weight_bytes")
                              if k in r["extra"]} for name, r in res.items()},
               # a decode step's time over its weights' stream at the measured read rate: near 1 is
               # bandwidth-bound; far above, on a GPU, the host (Python, launches) sets the pace
               "engine_decode_over_weight_stream": report.get("engine_decode_over_weight_stream"),
               # the engine times its forward on the host's clock without waiting for the GPU: on
               # CUDA that is the launches, and the GPU's time lands in sampling (its first sync)
               "forward_share_note": "host launch time on CUDA" if not args.dry_run else "CPU time",
               "log": lines}
    details["headline"] = [f"{name}: {r['seconds']:.2f} s, {r['tokens_per_second']:.0f} tok/s"
                           for name, r in details["results"].items()]
    summary = (f"{workload}: engine {engine['tokens_per_second']:.0f} tok/s, {details['speedup']:.2f}x {other}; "
               f"same tokens for {details['same_tokens']:.0%}")
    # the same greedy tokens are expected in float32; in bfloat16 they part after near-ties, so a low
    # share is reported, not failed (tests/acceptance/test_cuda.py judges the numerics)
    return "pass", summary, details


if __name__ == "__main__":
    sys.exit(main())
