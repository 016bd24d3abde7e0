"""Tiny models of every supported family, each carrying the features its real configs set.

One place for the test models of every family (issue #29): a tiny model must exercise whatever the
real checkpoints of its family do, or a defect in how we run layers one at a time goes unseen. What
each family's real configs set, and the tiny model keeps (hidden 48, 3 layers, 6 query heads in 2
KV groups of 3, head_dim 8, MLP 40, float64 unless asked):

- llama (SmolLM2, Llama 3): a tied head, a RoPE base other than 10k, Llama 3's ``llama3`` RoPE
  frequency scaling, RMSNorm.
- mistral: one sliding window for every layer, shorter than the calibration windows; an untied head.
- qwen2: q/k/v biases; ``use_sliding_window`` with ``max_window_layers``, so the first layers attend
  fully and the later ones through a window (the layer types differ).
- qwen3: q_norm/k_norm within a head, an explicit head_dim, attention bias off.
- gemma: embeddings scaled by sqrt(hidden), RMSNorm with ``1 + w``, GELU (tanh), multi-query
  attention in its 2B config (``mqa=True`` here: one KV head).
- gemma2: alternating sliding and full attention, attention and final logit soft-capping,
  ``query_pre_attn_scalar`` other than head_dim (the 27B's 144 against 128), four norms per layer.
- gemma3_text: ``layer_types`` mixing sliding and full attention (full in the last tiny layer, as the
  real 5:1 pattern puts full attention at every sixth), a sliding window shorter than the windows,
  two RoPE bases (``rope_local_base_freq`` 10k for sliding layers, ``rope_theta`` 1M with linear
  scaling for full ones), q_norm/k_norm, ``query_pre_attn_scalar``, scaled embeddings, a BOS-first
  tokenizer (:func:`bos_tokenizer`).
- opt: learned positions (offset 2), biases everywhere, LayerNorm, ReLU, and the 350M's
  ``word_embed_proj_dim`` below the hidden size (``project_in``/``project_out``).

The windows of tests that use these should be longer than :data:`SLIDING_WINDOW`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "opt")
SLIDING_WINDOW = 4  # tokens; windows in the tests are longer
BOS_FAMILIES = ("gemma", "gemma2", "gemma3_text")  # their tokenizers put BOS first


def tiny_config(family: str, vocab_size: int = 96, layers: int = 3, **overrides):
    """The tiny config of ``family`` with its real configs' features (module docstring)."""
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size, hidden_size=48, num_hidden_layers=layers, num_attention_heads=6,
                  max_position_embeddings=64, initializer_range=0.1, tie_word_embeddings=True)
    if family == "opt":
        kwargs = dict(common, ffn_dim=40, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0)
    else:
        kwargs = dict(common, intermediate_size=40, num_key_value_heads=2, head_dim=8, bos_token_id=0, eos_token_id=1)
    if family == "llama":
        kwargs.update(rope_theta=100000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16})
    if family == "mistral":
        kwargs.update(sliding_window=SLIDING_WINDOW, tie_word_embeddings=False)
    if family == "qwen2":
        kwargs.update(use_sliding_window=True, sliding_window=SLIDING_WINDOW, max_window_layers=1)
    if family == "qwen3":
        kwargs.update(attention_bias=False)
    if family == "gemma2":
        kwargs.update(sliding_window=SLIDING_WINDOW, query_pre_attn_scalar=6, attn_logit_softcapping=5.0,
                      final_logit_softcapping=3.0)
    if family == "gemma3_text":
        types = ["sliding_attention"] * (layers - 1) + ["full_attention"]
        kwargs.update(sliding_window=SLIDING_WINDOW, query_pre_attn_scalar=6, layer_types=types,
                      rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                      rope_scaling={"rope_type": "linear", "factor": 8.0})
    kwargs.update(overrides)
    mqa = kwargs.pop("mqa", False)
    if mqa:
        kwargs["num_key_value_heads"] = 1
    return AutoConfig.for_model(family, **kwargs)


def make_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float64, **overrides) -> nn.Module:
    """A seeded tiny causal LM of ``family`` with random (non-zero) biases and norm weights, in eval mode."""
    from transformers import AutoModelForCausalLM

    from base.adapters import get_adapter

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides)).to(dtype).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.1)
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:  # not the identity (1, Gemma's 1 + w: 0): each norm matters
                p.normal_(1.0 - get_adapter(family).norm_offset, 0.1)
    return model


def bos_tokenizer(vocab_size: int = 96):
    """The tiny tokenizer with a post-processor that puts <s> before every text (Gemma's convention)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from tests.conftest import make_tokenizer

    tok = make_tokenizer(vocab_size)
    backend = tok.backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def save_family(family: str, out: Path, *, dtype: torch.dtype = torch.float32, seed: int = 0, vocab_size: int = 96,
                **overrides) -> Path:
    """A tiny ``family`` checkpoint directory (config, safetensors, tokenizer: BOS-first for Gemma; a
    ``vocab_size`` above the byte alphabet's 258 gives it merges, which llama.cpp needs)."""
    from tests.conftest import make_tokenizer

    tokenizer = bos_tokenizer(vocab_size) if family in BOS_FAMILIES else make_tokenizer(vocab_size)
    model = make_model(family, seed=seed, dtype=dtype, vocab_size=len(tokenizer), **overrides)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
