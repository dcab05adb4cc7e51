"""Built-in model presets (tiny random configs of each supported family, offline) and loading.

A ``MODEL`` argument anywhere in orca-compile is a preset name, a local checkpoint directory, or a
hub id (loaded with ``AutoModelForCausalLM``; needs the network or the HF cache).
"""
from __future__ import annotations

import os

import torch

DEFAULT_PRESET = "tiny-llama"
_IDS = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)  # inside the tiny vocabularies
_SMALL = dict(vocab_size=256, max_position_embeddings=512, **_IDS)


def _configs():
    import transformers as tf

    llama_like = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, **_SMALL)
    return {
        "tiny-llama": lambda: tf.LlamaConfig(**llama_like),
        "tiny-gpt2": lambda: tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=512, **_IDS),
        "tiny-opt": lambda: tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                         word_embed_proj_dim=64, **_SMALL),
        "tiny-qwen2": lambda: tf.Qwen2Config(**llama_like),
        "tiny-mistral": lambda: tf.MistralConfig(**llama_like, sliding_window=16),
        "tiny-gemma2": lambda: tf.Gemma2Config(**llama_like, head_dim=16, sliding_window=16,
                                               attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
        "tiny-gpt-neox": lambda: tf.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                  num_attention_heads=4, rotary_pct=0.25, **_SMALL),
        "tiny-llama-mqa": lambda: tf.LlamaConfig(**{**llama_like, "num_key_value_heads": 1},
                                                 tie_word_embeddings=True, attention_bias=True),
        # mixture-of-experts: Mixtral (top-2 of 4, renormalised), Qwen2-MoE (top-2 of 4 not renormalised,
        # a sigmoid-gated shared expert, and a dense layer after the sparse one)
        "tiny-mixtral": lambda: tf.MixtralConfig(**llama_like, num_local_experts=4, num_experts_per_tok=2),
        "tiny-qwen2-moe": lambda: tf.Qwen2MoeConfig(**llama_like, num_experts=4, num_experts_per_tok=2,
                                                    moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                                    mlp_only_layers=[1]),
        # attention sinks (per-head logits in the softmax), alternating sliding and full attention,
        # biased experts with GPT-OSS's clamped SwiGLU, YaRN
        "tiny-gpt-oss": lambda: tf.GptOssConfig(**{**llama_like, "head_dim": 16}, num_local_experts=4,
                                                num_experts_per_tok=2, sliding_window=8, rope_parameters=dict(
                                                    rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0,
                                                    truncate=False, original_max_position_embeddings=16,
                                                    rope_theta=150000.0)),
        # ALiBi: positions only as a per-head linear bias of the scores
        "tiny-bloom": lambda: tf.BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=256, **_IDS),
        # GPT-2 small's shape with random weights: the benchmark model
        "gpt2-small-random": lambda: tf.GPT2Config(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024),
        # a Mixtral-shaped mixture of experts of about GPT-2 small's size (8 experts, top 2, GQA):
        # the mixture-of-experts benchmark model (workload w1-moe)
        "mixtral-small-random": lambda: tf.MixtralConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=6,
                                                         num_attention_heads=8, num_key_value_heads=2,
                                                         num_local_experts=8, num_experts_per_tok=2,
                                                         vocab_size=32000, max_position_embeddings=1024),
        # Qwen2.5-0.5B's shape (24 layers, hidden 896, 14 heads / 2 KV heads, MLP 4864, tied
        # embeddings, vocab 151936) with random weights: workload w2's model, saved in bfloat16
        "qwen2.5-0.5b-random": lambda: tf.Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                                      num_attention_heads=14, num_key_value_heads=2,
                                                      vocab_size=151936, tie_word_embeddings=True,
                                                      max_position_embeddings=32768, rope_theta=1000000.0,
                                                      rms_norm_eps=1e-6),
    }


def preset_names() -> list[str]:
    return list(_configs())


def preset_config(name: str):
    configs = _configs()
    if name not in configs:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(configs)}")
    config = configs[name]()
    config.bos_token_id = config.eos_token_id = config.pad_token_id = 0  # inside the tiny vocabularies
    return config


def load_model(name_or_path: str, dtype: torch.dtype | str | None = None, device: str | None = None, seed: int = 0):
    """A preset (random weights from ``seed``), a local directory, or a hub id -> model in eval mode."""
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    if name_or_path in _configs():
        torch.manual_seed(seed)
        config = preset_config(name_or_path)
        model = AutoModelForCausalLM.from_config(config)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # GPT-2's defaults lie outside the vocab
            setattr(model.generation_config, key, getattr(config, key))
        if dtype is not None:
            model = model.to(dtype)
    else:
        if not os.path.isdir(name_or_path):
            if name_or_path.startswith(("/", "./", "../", "~")) or os.sep + os.sep in name_or_path:
                raise ValueError(f"no checkpoint directory at {name_or_path!r}")
            if "/" not in name_or_path and name_or_path.startswith("tiny"):
                raise ValueError(f"unknown preset {name_or_path!r}; presets: {', '.join(preset_names())}")
        try:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype or "auto")
        except OSError as exc:  # HF's message names the hub but not the id the user gave
            reason = " ".join(str(exc).split())  # one line, as every error the CLI prints
            raise ValueError(f"could not load {name_or_path!r} as a checkpoint directory or hub id: {reason}") from exc
    if device:
        model = model.to(device)
    return model.eval()


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; one of {', '.join(_DTYPES)}")
    return _DTYPES[name]
