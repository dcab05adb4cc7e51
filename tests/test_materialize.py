"""A rank of a split checkpoint reads only its shard: built on meta tensors, partitioned, then
filled slice by slice from the safetensors files. Its tensors equal those of the same rank cut
from the fully loaded model, and the bytes it read are the bytes it holds, less than the
checkpoint's."""
from __future__ import annotations

import multiprocessing

import pytest
import torch

import orca_compile
from orca_compile import SamplingParams
from orca_compile.compiler import ModelSpec
from orca_compile.passes.graph_utils import fetch_attr
from orca_compile.presets import load_model


def _held(gm) -> dict:
    return {n.target: fetch_attr(gm, n.target) for n in gm.graph.find_nodes(op="get_attr")
            if isinstance(fetch_attr(gm, n.target), torch.Tensor)}


@pytest.mark.parametrize("name,tp,pp,rank,vocab_parallel", [
    ("tiny-gpt2", 2, 1, 1, False),  # Conv1D weights are [in, out]: the other dimension is sliced
    ("tiny-llama-mqa", 2, 1, 1, True),  # a tied head (lm_head.weight is not in the file), one KV head
    ("tiny-gemma2", 2, 2, 3, True),  # the last stage's second rank, its head's half of the vocabulary
    ("tiny-gemma2", 2, 2, 0, True),  # the first stage: no head, a vocab-parallel plan or not
])
def test_a_rank_reads_only_its_shard(tmp_path, name, tp, pp, rank, vocab_parallel):
    model = load_model(name, dtype=torch.float64)
    model.save_pretrained(tmp_path)
    spec = ModelSpec(str(tmp_path), backend="eager", dtype="float64", tensor_parallel_size=tp,
                     pipeline_parallel_size=pp, rank=rank, vocab_parallel_head=vocab_parallel)
    shard = spec.build()
    want = orca_compile.compile(model, tensor_parallel_size=tp, rank=rank % tp, pipeline_parallel_size=pp,
                                stage=rank // tp, vocab_parallel_head=vocab_parallel)
    got_t, want_t = _held(shard.graph_module), _held(want.graph_module)
    assert sorted(got_t) == sorted(want_t)
    for target, t in want_t.items():
        assert got_t[target].device.type == "cpu" and torch.equal(got_t[target], t), target
    assert shard.device.type == "cpu"
    slices = shard.graph_module.meta.get("orca_weight_slices", {})
    computed = {n for n, _ in model.named_buffers()}  # rotary tables, scales: not in the file
    from_file = {id(t): t.numel() * t.element_size() for k, t in got_t.items()
                 if slices.get(k, (k,))[0] not in computed}
    assert shard.bytes_read == sum(from_file.values())  # read exactly what it holds, each tensor once
    whole = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    assert shard.bytes_read < 0.8 * whole


def test_a_checkpoint_split_across_processes_serves_hf_tokens(tmp_path):
    model = load_model("tiny-llama", dtype=torch.float64)
    model.save_pretrained(tmp_path)
    prompts = [[5, 17, 3, 99, 4], [42, 7]]
    with orca_compile.optimize(str(tmp_path), tensor_parallel_size=2, dtype="float64", num_kv_blocks=16,
                               block_size=4) as engine:
        procs = list(engine.executor.processes)
        outs = engine.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(6):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        assert out.token_ids == ids[len(prompt):]
    assert not any(p.is_alive() for p in procs) and not multiprocessing.active_children()
