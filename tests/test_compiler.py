"""compile() and lower(): which stages and records an artifact carries, and when lower() makes a
new one."""
import pytest
import torch

import orca_compile
from orca_compile.passes import lower_cpu
from orca_compile.passes.manager import DEFAULT_PIPELINE
from orca_compile.presets import load_model

PORTABLE = ["captured", *(stage for stage, _ in DEFAULT_PIPELINE)]


@pytest.mark.skipif(not (lower_cpu.available("orca") and lower_cpu.available("onednn")),
                    reason="needs the C GEMM (a C compiler) and oneDNN")
def test_lowering_again_keeps_the_portable_stages_and_none_of_the_other_lowering():
    cpu = orca_compile.compile(load_model("tiny-llama", dtype=torch.float32), backend="cpu")
    assert list(cpu.stages) == PORTABLE + ["linears", "attention", "norms", "rope", "lowered"]
    onednn = orca_compile.lower(cpu, "onednn")
    assert onednn.backend == "onednn" and list(onednn.stages) == PORTABLE + ["linears", "lowered"]
    assert [r.name for r in onednn.records] == [f.__name__ for _, f in DEFAULT_PIPELINE] + [
        "lower_linears", "alias_weights"]
    assert cpu.backend == "cpu" and "rope" in cpu.stages  # the input is as it was
    assert orca_compile.lower(cpu, "auto") is cpu and orca_compile.lower(cpu, "cpu") is cpu
    eager = orca_compile.lower(cpu, "eager")
    assert eager.graph_module is cpu.stages["final"] and list(eager.stages) == PORTABLE + ["lowered"]


@pytest.mark.skipif(not lower_cpu.available("orca"), reason="needs the C GEMM (a C compiler)")
def test_an_artifact_without_its_final_graph_cannot_be_lowered_otherwise():
    cpu = orca_compile.compile(load_model("tiny-llama", dtype=torch.float32), backend="cpu", keep_stages=False)
    assert list(cpu.stages) == ["lowered"]
    with pytest.raises(ValueError, match="without keeping its 'final' graph; compile the model again with backend='eager'"):
        orca_compile.lower(cpu, "eager")
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        orca_compile.lower(cpu, "gpu")
