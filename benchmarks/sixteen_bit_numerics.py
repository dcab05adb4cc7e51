"""How far the engine's 16-bit-weights path (backend "cpu" on a bfloat16/float16 checkpoint) is from
HF on the same checkpoint, read in float32 (the oracle) and run in its own 16-bit dtype: the
largest log-prob difference over tests/acceptance/test_sixteen_bit.py's workload, per family and
dtype. The figures behind that test's tolerance (2e-5).

    PYTHONPATH=. python benchmarks/sixteen_bit_numerics.py
"""
import tempfile

import torch
from transformers import AutoModelForCausalLM
import orca_compile
from orca_compile.presets import load_model
from tests.acceptance.test_engine_vs_hf import hf_generate, random_workload, serve
for name in ["tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-gemma2", "tiny-mixtral"]:
    for dtype in (torch.bfloat16, torch.float16):
        d = tempfile.mkdtemp()
        load_model(name, dtype=dtype).save_pretrained(d)
        o = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        if getattr(o.config, "_experts_implementation", None) not in (None, "eager"):
            o.set_experts_implementation("eager")
        ob = AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval()
        if getattr(ob.config, "_experts_implementation", None) not in (None, "eager"):
            ob.set_experts_implementation("eager")
        e = orca_compile.optimize(d, backend="cpu", max_num_seqs=4, max_num_batched_tokens=16, block_size=4, num_kv_blocks=128)
        work = random_workload(e.info.vocab_size, 8, seed=4)
        final = serve(e, work)
        m = mb = 0
        for rid, p, params, _ in work:
            t, lp = hf_generate(o, p, params)
            m = max(m, max(abs(a - b) for a, b in zip(final[rid].logprobs, lp)))
            with torch.no_grad():
                lg = ob(torch.tensor([p + t[:-1]])).logits[0, len(p) - 1:].float()
            lpb = torch.log_softmax(lg, -1).gather(1, torch.tensor(t)[:, None])[:, 0].tolist()
            mb = max(mb, max(abs(a - b) for a, b in zip(final[rid].logprobs, lpb)))
        print(name, dtype, f"max |engine - HF float32| {m:.2e}   max |engine - HF {dtype}| {mb:.2e}")
