"""`orca-compile dump` for every preset and format."""
import os
import re
import stat

import pytest

from orca_compile.cli import main
from orca_compile.passes.manager import STAGES
from orca_compile.presets import preset_names
from tests.conftest import family  # noqa: F401  (fixture)

TINY = [p for p in preset_names() if p.startswith("tiny")]


@pytest.mark.parametrize("preset", TINY)
def test_dump_every_preset_every_stage_text(preset, tmp_path, capsys):
    out = tmp_path / "g.txt"
    assert main(["dump", preset, "--stage", "all", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "orca.attention" in printed and "flatten_tokens -> flattened" in printed  # the summary
    for stage in STAGES:
        text = (tmp_path / f"g.{stage}.txt").read_text()
        assert "input  input_ids: i64[" in text
        if stage == "captured":
            assert "i64[B, T]" in text
        if stage in ("split", "pruned", "final"):
            assert "orca.attention(" in text and "k_cache_0: " in text
    final = (tmp_path / "g.final.txt").read_text()
    assert "scaled_dot_product_attention" not in final and "[B" not in final


@pytest.mark.parametrize("preset,moe_layers,experts", [("tiny-mixtral", 2, "4 experts, top 2"),
                                                      ("tiny-qwen2-moe", 1, "4 experts, top 2")])
def test_dump_shows_the_expert_layers_and_counts_them(preset, moe_layers, experts, capsys):
    assert main(["dump", preset, "--format", "table"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert f"({moe_layers} mixture-of-experts: {experts})" in header
    # the summary's column: two expert projections (gate+up, down) a mixture-of-experts layer
    columns = next(line for line in out.splitlines() if line.startswith("stage")).split()
    final = next(line for line in out.splitlines() if line.startswith("final")).split()
    assert int(final[columns.index("expert_linear")]) == 2 * moe_layers
    # the table lists them under their layers
    rows = [line for line in out.splitlines() if "orca.expert_linear" in line]
    assert len(rows) == 2 * moe_layers and all("layer " in row for row in rows)


@pytest.mark.parametrize("fmt,marker", [("text", "= orca.attention("), ("table", "layer 1"), ("dot", "digraph")])
def test_dump_formats_to_stdout(fmt, marker, capsys):
    assert main(["dump", "tiny-gpt2", "--format", fmt]) == 0
    out = capsys.readouterr().out
    assert marker in out
    if fmt == "table":
        assert out.count("orca.attention") >= 2
    if fmt == "dot":
        assert 'subgraph "cluster_layer 0"' in out and out.rstrip().endswith("}")


def _fake_dot(tmp_path):
    exe = tmp_path / "bin" / "dot"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\n[ \"$1\" = -Tsvg ] || exit 3\nn=$(grep -c -- '->')\necho \"<svg edges='$n'></svg>\"\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe.parent


def test_svg_goes_through_graphviz(tmp_path, monkeypatch, capsys):
    """The dot source is piped to `dot -Tsvg`; a stand-in `dot` on PATH proves the plumbing."""
    monkeypatch.setenv("PATH", f"{_fake_dot(tmp_path)}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "g.svg"
    assert main(["dump", "tiny-opt", "--format", "svg", "-o", str(out)]) == 0
    svg = out.read_text()
    assert svg.startswith("<svg edges=") and int(svg.split("'")[1]) > 50


def test_svg_without_graphviz_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert main(["dump", "tiny-opt", "--format", "svg"]) == 2
    err = capsys.readouterr().err
    assert "needs Graphviz's `dot`" in err and "apt-get install graphviz" in err
    assert len(err.strip().splitlines()) == 1


def test_unknown_preset_is_a_clear_error(capsys):
    assert main(["dump", "tiny-nonsense"]) == 2
    assert "unknown preset 'tiny-nonsense'" in capsys.readouterr().err


def test_local_checkpoint_directory(tmp_path, capsys):
    from orca_compile.presets import load_model

    load_model("tiny-qwen2").save_pretrained(tmp_path / "ckpt")
    assert main(["dump", str(tmp_path / "ckpt"), "--summary-only"]) == 0
    assert "Qwen2ForCausalLM: 2 layers" in capsys.readouterr().out


def test_presets_lists_every_preset(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in preset_names())


def test_every_format_renders_every_stage_of_every_family(family, tmp_path, monkeypatch):
    """The renderers on each family's graphs (compiled once per session), SVG via a stand-in dot."""
    from orca_compile import dump
    from tests.conftest import compiled_preset

    monkeypatch.setenv("PATH", f"{_fake_dot(tmp_path)}{os.pathsep}{os.environ['PATH']}")
    _, cm = compiled_preset(family)
    for stage, gm in cm.stages.items():
        text = dump.render(gm, "text")
        table = dump.render(gm, "table")
        dot = dump.render(gm, "dot", title=stage)
        svg = dump.render(gm, "svg", title=stage)
        nodes = len(gm.graph.nodes)
        assert text.count("\n") == nodes and table.count("\n") == nodes + 1  # header + rule, no output row
        assert dot.count(" -> ") == sum(len(n.all_input_nodes) for n in gm.graph.nodes)
        assert svg.startswith("<svg edges=")


def test_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    assert main(["dump", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"orca-compile: error: no checkpoint directory at {str(tmp_path / 'nowhere')!r}"


def test_generate_prints_tokens_and_logprobs(capsys):
    assert main(["generate", "tiny-gpt2", "--prompt-ids", "1 2 3", "--prompt-ids", "4,5", "--max-tokens", "4",
                 "--ignore-eos", "--logprobs", "--num-kv-blocks", "16"]) == 0
    out = capsys.readouterr().out
    lines = [l for l in out.splitlines() if "tokens:" in l]
    assert len(lines) == 2 and all(len(eval(l.split("tokens: ")[1].split("  (")[0])) == 4 for l in lines)
    assert out.count("logprobs:") == 2


@pytest.mark.parametrize("argv,match", [
    (["generate", "tiny-llama", "--prompt", "hello"], "needs a tokenizer"),
    (["generate", "tiny-llama", "--prompt-ids", "1 x"], "--prompt-ids takes integers"),
    (["generate", "tiny-llama", "--prompt-ids", "1 2", "--top-p", "0"], "top_p"),
    (["generate", "tiny-llama"], "at least one --prompt"),
    (["bench", "w9"], "unknown workload"),
    (["bench", "w1-tiny", "--systems", "engine,vllm"], "unknown system 'vllm'"),
    (["bench", "orca-tiny", "--tp", "2", "--repeat", "3"], "not --repeat, --tp"),
    (["bench", "orca-tiny", "--rates", "1,x"], "--rates takes requests per second"),
    (["demo", "--requests", "0"], "at least 1 request"),
    (["generate", "tiny-llama", "--prompt-ids", "1 2", "--stream"], "this model has no tokenizer"),
    (["generate", "tiny-llama", "--prompt-ids", "1", "--prompt-ids", "2", "--stream"], "got 2 prompts"),
])
def test_generate_and_bench_errors_are_one_line(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(match, err[0])


def test_demo_serves_staggered_requests_with_a_live_table(capsys):
    assert main(["demo", "--requests", "6"]) == 0
    out = capsys.readouterr().out
    assert "passes" in out.lower()  # the rewrite summary comes first
    rows = [l for l in out.splitlines() if re.match(r"\s+\d+\s+\d+\s+\d+\s+\d+\s+\d+\s+\d+/\d+", l)]
    assert len(rows) > 6
    assert any(":P" in r and ":D" in r for r in rows), "no iteration mixed a prefill chunk with decodes"
    assert sum("joined" in r for r in rows) >= 2 and sum(r.count(",") + 1 for r in rows if "done" in r) >= 6
    assert re.search(r"6 requests, \d+ tokens generated .* tokens/s", out)
    assert out.rstrip().endswith("KV blocks in use at the end: 0")


def test_dump_lowered_is_the_graph_the_engine_runs_here(tmp_path, capsys):
    import torch

    import orca_compile
    from orca_compile.passes import lower_cpu
    from orca_compile.presets import load_model

    engine = orca_compile.optimize("tiny-llama", num_kv_blocks=8)
    runs = engine.executor.runner.model.graph_module
    out = tmp_path / "lowered.txt"
    assert main(["dump", "tiny-llama", "--stage", "lowered", "-o", str(out)]) == 0
    summary = capsys.readouterr().out
    assert f"backend {engine.backend}" in summary
    from orca_compile.dump import format_text

    assert out.read_text() == format_text(runs)  # the same graph, node for node
    if lower_cpu.available("orca"):
        assert engine.backend == "cpu"
        assert "gemm_cpu.linear(" in out.read_text() and "attention_cpu.attention(" in out.read_text()
    # the portable graph is the lowered one when nothing lowers it
    assert main(["dump", "tiny-llama", "--backend", "eager", "--stage", "lowered", "-o", str(out)]) == 0
    portable = orca_compile.compile(load_model("tiny-llama", dtype=torch.float32))
    assert out.read_text() == format_text(portable.stages["final"])


def test_dump_refuses_a_stage_the_backend_has_not(capsys):
    assert main(["dump", "tiny-llama", "--backend", "eager", "--stage", "norms"]) == 2
    assert "no stage 'norms' with backend eager" in capsys.readouterr().err


def test_dump_shows_a_ranks_shard_and_generate_runs_tensor_parallel(tmp_path, capsys):
    out = tmp_path / "p.txt"
    assert main(["dump", "tiny-llama", "--tp", "2", "--rank", "1", "--stage", "partitioned", "-o", str(out)]) == 0
    text = out.read_text()
    assert text.count("= orca.all_reduce(") == 4  # two a layer
    assert "k_cache_0: f32[NB, BS, 1, 16]" in text  # 2 KV heads over 2 ranks
    assert "partitioned" in capsys.readouterr().out  # the summary's row
    args = ["generate", "tiny-llama", "--prompt-ids", "5 17 3 99", "--prompt-ids", "42 7", "--max-tokens", "6",
            "--num-kv-blocks", "16"]
    assert main(args) == 0
    one = capsys.readouterr().out
    assert main(args + ["--tp", "2"]) == 0
    assert capsys.readouterr().out == one


def test_generate_runs_pipeline_stages_and_dump_shows_one(tmp_path, capsys):
    out = tmp_path / "s.txt"
    assert main(["dump", "tiny-llama", "--pp", "2", "--rank", "1", "--stage", "pipelined", "-o", str(out)]) == 0
    text = out.read_text()
    assert "input  hidden: f32[T, 64]" in text and text.count("= orca.attention(") == 1
    assert "k_cache_1" not in text  # stage 1 holds layer 1's cache only, as its k_cache_0
    capsys.readouterr()
    args = ["generate", "tiny-gpt2", "--prompt-ids", "5 17 3 99", "--prompt-ids", "42 7", "--max-tokens", "6",
            "--num-kv-blocks", "16"]
    assert main(args) == 0
    one = capsys.readouterr().out
    assert main(args + ["--pp", "2"]) == 0
    assert capsys.readouterr().out == one


def test_plan_prints_the_chosen_plan_and_runners_up_for_a_cluster_from_a_config_file(tmp_path, capsys):
    """A config.json alone (no weights) on an example cluster: the JSON lists every plan, best first,
    each within the devices and their memory; the text names the chosen plan and its stages."""
    import json
    import pathlib

    import transformers as tf

    tf.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=4, vocab_size=1024).save_pretrained(tmp_path)
    cluster = str(pathlib.Path(__file__).resolve().parent.parent / "examples" / "clusters" / "dgx-h100.json")
    assert main(["plan", str(tmp_path / "config.json"), "--devices", "4", "--cluster", cluster, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    plans = report["plans"]
    assert len(plans) >= 3 and report["devices"] == 4
    seconds = [p["predicted_iteration_seconds"]["decode"] for p in plans]
    assert seconds == sorted(seconds)  # latency objective: best first
    for p in plans:
        assert p["devices"] == p["tensor_parallel_size"] * p["pipeline_parallel_size"] <= 4
        assert p["cuts"][0] == 0 and p["cuts"][-1] == 4
        assert max(m["total"] for m in p["memory_bytes_per_rank"]) <= p["memory_limit_bytes"]
    assert main(["plan", str(tmp_path), "--devices", "4", "--cluster", cluster, "--objective", "throughput"]) == 0
    out = capsys.readouterr().out
    assert "objective: throughput" in out and "chosen:  tp=" in out and "stage 0: layers 0-" in out


def test_plan_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "cluster.json"
    bad.write_text('{"nodes": 1}')
    assert main(["plan", "tiny-llama", "--devices", "2", "--cluster", str(bad)]) == 2
    assert "missing ['devices_per_node'" in capsys.readouterr().err
    assert main(["plan", str(tmp_path / "nowhere"), "--devices", "2", "--cluster", str(bad)]) == 2
    assert "cluster" in capsys.readouterr().err
