"""Models orca-compile cannot handle get a ValueError naming the model class and the construct."""
import pytest
import torch
from transformers import (AttentionInterface, BertConfig, BertForMaskedLM, BertLMHeadModel, LlamaConfig,
                          LlamaForCausalLM)

import orca_compile

BERT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
LLAMA = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=2)


def test_encoder_model_class_rejected():
    with pytest.raises(ValueError, match=r"BertForMaskedLM is not a causal LM class"):
        orca_compile.compile(BertForMaskedLM(BertConfig(**BERT)).eval())


def test_bidirectional_attention_rejected():
    """BertLMHeadModel is in the causal-LM mapping, but with is_decoder=False its mask is bidirectional."""
    with pytest.raises(ValueError, match=r"BertLMHeadModel attention in bert\.encoder\.layer\.0\.attention.*bidirectional"):
        orca_compile.compile(BertLMHeadModel(BertConfig(**BERT)).eval())


def _sigmoid_attention(module, q, k, v, attention_mask, scaling=None, dropout=0.0, **kwargs):
    w = torch.sigmoid(q @ k.transpose(-1, -2) * scaling)
    return (w @ v).transpose(1, 2).contiguous(), w


def _softmax_over_queries(module, q, k, v, attention_mask, scaling=None, dropout=0.0, **kwargs):
    w = torch.softmax(q @ k.transpose(-1, -2) * scaling, dim=-2)
    return (w @ v).transpose(1, 2).contiguous(), w


@pytest.mark.parametrize("name,fn,message", [
    ("orca_test_sigmoid", _sigmoid_attention,
     r"LlamaForCausalLM: found 0 attention ops .* model\.layers\.0\.self_attn"),
    ("orca_test_softmax_q", _softmax_over_queries,
     r"LlamaForCausalLM: cannot split the attention at node 'softmax.*model\.layers\.0\.self_attn.*last \(key\) dimension"),
])
def test_unknown_attention_form_names_class_and_construct(name, fn, message):
    """An attention with no softmax at all, and a softmax that is not over the keys."""
    AttentionInterface.register(name, fn)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA))
    model.set_attn_implementation(name)
    with pytest.raises(ValueError, match=message):
        orca_compile.compile(model.eval())


def test_not_a_hf_model_rejected():
    with pytest.raises(ValueError, match=r"Linear is not a Hugging Face PreTrainedModel"):
        orca_compile.compile(torch.nn.Linear(2, 2))
