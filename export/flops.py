"""Matmul FLOPs per token of a decoder-only model, from its config (per-layer sizes included).

One multiply-add counts 2 FLOPs (as in the PaLM/nanoGPT MFU formula, ``6N`` for training and
``2N`` for inference per parameter). Per token and layer:

- linears: ``2 * hidden * (q + k + v + o widths) + 2 * hidden * width * (MLP linears)``, with
  widths ``heads * head_dim``, ``kv_heads * head_dim`` and the MLP width (3 linears when gated,
  2 in OPT);
- attention: ``4 * heads * head_dim * context`` (scores ``QKᵀ`` and the weighted sum ``AV``), where
  ``context`` is the mean number of keys a query sees over a causal sequence of ``seq_len`` tokens,
  ``(seq_len + 1) / 2``, capped by the sliding window on sliding layers;
- the LM head: ``2 * d * vocab`` once (``d`` is OPT's ``word_embed_proj_dim`` where it differs,
  plus its ``project_in``/``project_out``).

Norms, activations, rotary embeddings and softmax are not matmuls and are left out.
"""

from __future__ import annotations

from typing import Any

from base.adapters import get_adapter


def matmul_flops_per_token(config: Any, seq_len: int) -> dict[str, float]:
    """Matmul FLOPs per token for a forward pass over ``seq_len`` tokens.

    Args:
        config: a transformers config of a supported family; per-layer sizes
            (``layer_intermediate_sizes`` etc., as ``shrink_`` and surgeon configs record them)
            take precedence over the global ones.
        seq_len: tokens in the causal sequence.

    Returns:
        ``{"linears", "attention", "lm_head", "total"}`` in FLOPs per token.

    Example:
        >>> from transformers import LlamaConfig
        >>> cfg = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        ...                   num_key_value_heads=1, head_dim=4, vocab_size=10)
        >>> matmul_flops_per_token(cfg, seq_len=3)["total"]  # 2*8*(8+4+4+8) + 2*8*16*3 + 4*2*4*2 + 2*8*10
        1376.0
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    adapter = get_adapter(config.model_type)
    shapes = adapter.config_shapes(config)
    n_layers = len(shapes)
    hidden = int(config.hidden_size)
    hd = adapter.head_dim(config)
    window = getattr(config, "sliding_window", None)
    # Without layer_types (Mistral) a configured window applies to every layer.
    layer_types = getattr(config, "layer_types", None) or ["sliding_attention" if window else "full_attention"] * n_layers
    mlp_linears = len(adapter.channel_rows) + len(adapter.channel_cols)
    linears = attention = 0.0
    for i, s in enumerate(shapes):
        linears += 2 * hidden * hd * (2 * s.num_attention_heads + 2 * s.num_key_value_heads)
        linears += 2 * hidden * s.intermediate_size * mlp_linears
        context = (seq_len + 1) / 2
        if layer_types[i] == "sliding_attention" and window:
            context = sum(min(t, window) for t in range(1, seq_len + 1)) / seq_len
        attention += 4 * s.num_attention_heads * hd * context
    proj = int(getattr(config, "word_embed_proj_dim", None) or hidden)
    lm_head = 2.0 * proj * config.vocab_size + (2 * 2 * hidden * proj if proj != hidden else 0)
    return {"linears": linears, "attention": attention, "lm_head": lm_head, "total": linears + attention + lm_head}


FLOP_LENGTHS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def flops_table(config: Any) -> dict[str, float]:
    """Matmul FLOPs per token at several sequence lengths (the benchmark's FLOP ratio per cell)."""
    return {str(n): matmul_flops_per_token(config, n)["total"] for n in FLOP_LENGTHS}
