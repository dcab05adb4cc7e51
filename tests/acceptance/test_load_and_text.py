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
    assert engine.tokenizer is not None and engine.compiled.layers[0].dtype == torch.float64
    prompts = ["the cat sat on a mat", "dog ran to the park and then", "bird"]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    outs = engine.generate(prompts, params)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float64).eval()
    tok = AutoTokenizer.from_pretrained(checkpoint)
    for prompt, out in zip(prompts, outs):
        ids = tok(prompt, return_tensors="pt").input_ids
        assert out.prompt_token_ids == ids[0].tolist()
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:]
        assert out.token_ids == ref.tolist()
        assert out.text == tok.decode(ref, skip_special_tokens=True) and out.text


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
