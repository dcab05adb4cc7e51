"""Loading from a local directory written by ``save_pretrained`` (model and a tokenizer built
offline), and text in, text out, against HF ``generate`` on the same checkpoint."""
import pytest
import torch

import orca_compile
from orca_compile import SamplingParams
from orca_compile.presets import load_model

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "to", "park", "and", "then", "slept", "saw", "bird"]


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<unk>": 1} | {w: i + 2 for i, w in enumerate(WORDS)}
    vocab |= {f"w{i}": i for i in range(len(vocab), 256)}  # fill the tiny model's 256 ids
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")


def hf_reference(checkpoint, prompt, max_new_tokens):
    """HF ``generate`` alone on the same checkpoint, greedy, EOS ignored: (prompt ids, new ids, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float64).eval()
    tok = AutoTokenizer.from_pretrained(checkpoint)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return ids[0].tolist(), out[0, ids.shape[1]:].tolist(), tok


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    model = load_model("tiny-llama", dtype=torch.float64)
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def test_text_in_text_out_from_a_saved_checkpoint(checkpoint):
    engine = orca_compile.optimize(str(checkpoint), max_num_seqs=4, max_num_batched_tokens=32, block_size=4,
                                   num_kv_blocks=64)
    assert engine.tokenizer is not None and engine.executor.runner.model.layers[0].dtype == torch.float64
    prompts = ["the cat sat on a mat", "dog ran to the park and then", "bird"]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    outs = engine.generate(prompts, params)

    for prompt, out in zip(prompts, outs):
        prompt_ids, ref, tok = hf_reference(checkpoint, prompt, 8)
        assert out.prompt_token_ids == prompt_ids
        assert out.token_ids == ref
        assert out.text == tok.decode(ref, skip_special_tokens=True) and out.text


def test_streamed_text_pieces_join_into_the_final_text(checkpoint):
    """Through ``step()``: each output's ``new_text`` is what its step added, and the pieces of a
    request join into its final ``text``, the tokenizer's decode of its tokens."""
    engine = orca_compile.optimize(str(checkpoint), max_num_seqs=2, max_num_batched_tokens=8, block_size=4,
                                   num_kv_blocks=64)
    for i, prompt in enumerate(["the cat sat on a mat", "dog ran", "bird saw the park and then slept"]):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=5 + 3 * i, ignore_eos=True))
    pieces, final = {}, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            pieces.setdefault(out.request_id, []).append(out.new_text)
            if out.finished:
                final[out.request_id] = out
    tok = engine.tokenizer
    assert len(final) == 3
    for rid, out in final.items():
        assert "".join(pieces[rid]) == out.text == tok.decode(out.token_ids, skip_special_tokens=True)
        assert len(pieces[rid]) == len(out.token_ids)  # one output per sampled token (no chunk-only steps)


def test_the_cli_streams_the_text_hf_generates(checkpoint, capsys):
    from orca_compile.cli import main

    prompt = "dog ran to the park"
    assert main(["generate", str(checkpoint), "--prompt", prompt, "--max-tokens", "7", "--ignore-eos", "--stream",
                 "--num-kv-blocks", "32", "--block-size", "4", "--logprobs"]) == 0
    out = capsys.readouterr()
    text, logprobs = out.out.rstrip("\n").split("\n")
    _, ref, tok = hf_reference(checkpoint, prompt, 7)
    assert text == tok.decode(ref, skip_special_tokens=True)
    assert logprobs.startswith("logprobs: [") and len(eval(logprobs.split(": ", 1)[1])) == 7
    assert "(7 tokens, length)" in out.err


def test_a_directory_without_tokenizer_serves_token_ids_only(tmp_path):
    load_model("tiny-gpt2", dtype=torch.float32).save_pretrained(tmp_path)
    engine = orca_compile.optimize(str(tmp_path), num_kv_blocks=16, block_size=4)
    assert engine.tokenizer is None
    assert len(engine.generate([[1, 2, 3]], SamplingParams(max_tokens=3, ignore_eos=True))[0].token_ids) == 3
    with pytest.raises(ValueError, match="needs a tokenizer"):
        engine.add_request("t", "some text")


def test_a_missing_directory_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint directory"):
        orca_compile.optimize(str(tmp_path / "nope"))


def _hub_cache_with(checkpoint, root, repo_id):
    """A hub cache as ``huggingface_hub`` lays it out (``models--org--name/snapshots/<sha>``,
    ``refs/main`` naming the snapshot), holding ``checkpoint``'s files: the path a hub id takes
    for a user who downloaded the model before, without the network."""
    import shutil

    repo = root / ("models--" + repo_id.replace("/", "--"))
    sha = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(checkpoint, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    return root


def _cli(args, env):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "orca_compile.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})


def test_a_hub_id_loads_from_the_hub_cache_offline(checkpoint, tmp_path):
    """The hub-id path end to end, offline: model and tokenizer resolved through the hub cache,
    text in, the same tokens as HF ``generate`` on the same weights."""
    cache = _hub_cache_with(checkpoint, tmp_path / "hub", "orca-test/tiny-llama")
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    prompt = "the cat sat on a mat"
    proc = _cli(["generate", "orca-test/tiny-llama", "--prompt", prompt, "--max-tokens", "6", "--ignore-eos"], env)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if line.startswith("[0] "))
    tokens = [int(t) for t in lines["[0] tokens"].split("]")[0].strip("[").split(",")]
    _, ref, tok = hf_reference(checkpoint, prompt, 6)
    assert tokens == ref
    assert lines["[0] text"] == repr(tok.decode(ref, skip_special_tokens=True))

    # an id the cache does not hold: the error names it, and the CLI exits 2 with no traceback
    proc = _cli(["generate", "orca-test/not-there", "--prompt", prompt, "--max-tokens", "2"], env)
    assert proc.returncode == 2 and "'orca-test/not-there'" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
