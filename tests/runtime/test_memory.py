"""What the engine keeps alive: one copy of each weight.

The ``cpu`` backend packs every linear weight into the C GEMM's panels. The originals must not
stay pinned beside the packed copies: by the lowered module, by an unlowered stage the compiler
kept when ``optimize()`` compiled the model itself, or by torch.export's leftovers after capture. With
nothing pinning them, a user who drops the HF model after ``optimize(model)`` gets the memory back.
A ``CompiledModel`` passed in is the caller's and keeps its unlowered graph (other engines may run it).
"""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

import orca_compile
from orca_compile import SamplingParams
from orca_compile.passes import lower_cpu
from orca_compile.presets import load_model

pytestmark = pytest.mark.skipif(not lower_cpu.available("orca"), reason="the C GEMM needs a C compiler")

PROMPTS = [[5, 17, 3, 99], [42, 7]]


def _reference_tokens(model, max_tokens=5):
    out = []
    for p in PROMPTS:
        ids = torch.tensor([p])
        got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                             min_new_tokens=max_tokens, pad_token_id=0)
        out.append(got[0, len(p):].tolist())
    return out


def _engine_tokens(engine, max_tokens=5):
    return [r.token_ids for r in engine.generate(PROMPTS, SamplingParams(max_tokens=max_tokens, ignore_eos=True))]


def test_dropping_the_model_frees_every_packed_weight():
    model = load_model("tiny-gpt2", dtype=torch.float64)
    expected = _reference_tokens(model)
    packed_away = {name: weakref.ref(p) for name, p in model.named_parameters()
                   if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))}
    kept = weakref.ref(model.transformer.wte.weight)  # the embedding (tied to the LM head) is still read
    assert len(packed_away) == 4 * model.config.n_layer
    engine = orca_compile.optimize(model, max_num_seqs=4, num_kv_blocks=16, backend="cpu")
    compiled = engine.executor.runner.model
    lowered = compiled.graph_module
    assert lowered.meta["orca_lowering"]["dropped_weights"] >= len(packed_away)
    assert not any(name.endswith(tuple(packed_away)) for name, _ in lowered.named_parameters())
    assert list(compiled.stages) == ["lowered"]  # the engine's own compile: the unlowered graph is let go
    del model
    gc.collect()
    alive = [name for name, ref in packed_away.items() if ref() is not None]
    assert alive == [], f"originals of packed weights still alive after the model was dropped: {alive}"
    assert kept() is not None
    assert _engine_tokens(engine) == expected


def test_a_compiled_model_passed_in_keeps_its_graph_for_other_engines():
    model = load_model("tiny-gpt2", dtype=torch.float64)
    expected = _reference_tokens(model)
    compiled = orca_compile.compile(model, keep_stages=False)
    final = compiled.graph_module
    cpu = orca_compile.optimize(compiled, max_num_seqs=4, num_kv_blocks=16, backend="cpu")
    assert compiled.graph_module is final and cpu.executor.runner.model.graph_module is not final
    assert any(name.endswith("c_attn.weight") for name, _ in final.named_parameters())
    eager = orca_compile.optimize(compiled, max_num_seqs=4, num_kv_blocks=16, backend="eager")
    assert _engine_tokens(cpu) == expected
    assert _engine_tokens(eager) == expected


def test_capture_leaves_nothing_that_keeps_the_model_alive():
    model = load_model("tiny-gpt2", dtype=torch.float64)
    ref = weakref.ref(model)
    weight = weakref.ref(model.transformer.h[0].mlp.c_fc.weight)
    compiled = orca_compile.compile(model, keep_stages=False)
    del model, compiled
    gc.collect()
    assert ref() is None and weight() is None
