"""benchmarks/gpu_check.py, the GPU proof of issue 19, as far as a machine without a GPU can run it:
the whole dry run (every section at CPU sizes), the GPU mode's refusal without a device, and the
parent's bookkeeping (a killed pytest's counts, a section killed at its budget)."""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
MAX_FILES_BACK = 8  # what the device tool brings back from its output folder


def _module():
    """The script as a module (benchmarks/ is no package), loaded once."""
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
    return sys.modules["gpu_check"]


def _run(*args, timeout):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_the_dry_run_passes_every_section_and_writes_its_report(tmp_path):
    gc = _module()
    start = time.monotonic()
    res = _run("--dry-run", str(tmp_path), timeout=600)
    seconds = time.monotonic() - start
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["version"] == gc.REPORT_VERSION and report["mode"] == "dry-run" and report["ok"] is True
    assert list(report["sections"]) == [s.name for s in gc.SECTIONS]
    for name, sec in report["sections"].items():
        assert set(sec) == {"status", "seconds", "budget_s", "summary", "details", "traceback", "log"}, name
        assert sec["status"] == "pass", (name, sec["summary"], sec["traceback"])
        assert 0 < sec["seconds"] <= sec["budget_s"], name
    assert report["elapsed_s"] <= seconds
    assert report["device"]["torch"] and report["device"]["cuda"] is False

    kernels = report["sections"]["kernels"]["details"]
    assert kernels["counts"]["passed"] >= 4 and not kernels["counts"]["failed"]
    e2e = report["sections"]["end_to_end"]["details"]["tests"]
    props = [t["properties"] for t in e2e.values() if "properties" in t]
    assert props and all(p["fp32_max_logprob_err"] <= 1e-4 and p["fp32_tokens_compared"] > 0 for p in props)

    att = report["sections"]["attention"]["details"]
    assert att["copy_gb_per_s"] > 0 and att["matmul_tflop_per_s"] > 0
    for mix in ("decode-heavy", "prefill-heavy"):
        row = att["mixes"][mix]
        assert row["ok"] and row["triton_ms"] > 0 and row["torch_ref_ms"] > 0 and row["kv_bytes"] > 0
        assert row["of_copy_bandwidth"] == pytest.approx(row["gb_per_s"] / att["copy_gb_per_s"])
    for name in ("w1", "w2"):
        w = report["sections"][name]["details"]
        assert w["speedup"] > 0 and w["same_tokens"] >= 0.75 and len(w["results"]) == 2, name

    summary = (tmp_path / "summary.txt").read_text().splitlines()
    for name in report["sections"]:
        assert any(line.startswith(name) and " pass " in line for line in summary), name
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) <= MAX_FILES_BACK and all(p.parent == tmp_path for p in files), files
    assert (tmp_path / "kernels-junit.xml").exists() and (tmp_path / "end_to_end.log").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has the GPU the test is without")
def test_without_a_gpu_the_gpu_mode_fails_its_environment_and_skips_the_rest(tmp_path):
    res = _run("--sections", "environment,attention", str(tmp_path), timeout=300)
    assert res.returncode == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["mode"] == "gpu" and report["ok"] is False
    assert report["sections"]["environment"]["status"] == "fail"
    assert "no CUDA device" in report["sections"]["environment"]["summary"]
    assert report["sections"]["attention"]["status"] == "skip"


def test_a_deadline_too_short_for_a_section_is_reported_not_run(tmp_path):
    res = _run("--dry-run", "--sections", "w1", "--deadline", "5", str(tmp_path), timeout=60)
    report = json.loads((tmp_path / "report.json").read_text())
    assert res.returncode == 1 and report["sections"]["w1"]["status"] == "timeout"
    assert "not started" in report["sections"]["w1"]["summary"]


def test_bad_arguments_are_refused(tmp_path):
    for args, match in ((["--sections", "w9"], "unknown section 'w9'"), (["--deadline", "0"], "--deadline")):
        res = _run(*args, str(tmp_path), timeout=60)
        assert res.returncode != 0 and match in res.stderr, res.stderr


def test_a_section_past_its_budget_is_killed_with_its_children(tmp_path):
    gc = _module()
    pid_file = tmp_path / "grandchild.pid"
    child = ("import pathlib, subprocess, sys, time; "
             "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
             f"pathlib.Path({str(pid_file)!r}).write_text(str(p.pid)); time.sleep(60)")
    with open(tmp_path / "log", "w") as f:
        start = time.monotonic()
        rc, timed_out = gc._run([sys.executable, "-c", child], f, None, budget=3)
    assert timed_out and time.monotonic() - start < 20
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # SIGKILL is delivered at once; its reaping by init may lag a little
        try:
            os.kill(grandchild, 0)
            if pathlib.Path(f"/proc/{grandchild}/stat").read_text().split()[2] == "Z":  # killed, not yet reaped
                break
        except (ProcessLookupError, FileNotFoundError):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the section's grandchild {grandchild} outlived the kill")


def test_a_killed_pytest_is_counted_from_its_verbose_lines(tmp_path):
    gc = _module()
    text = "\n".join(["tests/a.py::test_one PASSED [ 50%]", "tests/a.py::test_two FAILED [100%]",
                      "tests/a.py::test_three SKIPPED (no gpu) [100%]"])
    res = gc._pytest_result(text, tmp_path / "missing.xml", -9, True, 10.0, 10.0, "x.log")
    assert res["status"] == "timeout"
    assert res["details"]["counts"] == {"passed": 1, "failed": 1, "skipped": 1, "errors": 0}


def test_without_an_install_the_sections_import_the_checkout_through_links(tmp_path):
    # a GPU machine's pip may refuse `pip install -e .`; the script then links the checkout into
    # pyproject.toml's package layout and puts that first on PYTHONPATH
    gc = _module()
    root = gc.link_tree(tmp_path)
    code = "import orca_compile.passes.lower_cpu as m, orca_compile.runtime.batch as b; print(m.__file__, b.__file__)"
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(root)))
    assert res.returncode == 0, res.stderr[-2000:]
    assert all(f.startswith(str(root)) for f in res.stdout.split()), res.stdout
