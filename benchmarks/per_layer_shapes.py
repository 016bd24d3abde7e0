"""A real model's shapes (seeded random float32 weights) dense and per-layer, for the vLLM parity run on real shapes.

``gemma3-270m``: the per-layer checkpoint removes ``128 x (i mod 5)`` MLP channels and, in every third layer,
one of the 4 query heads (1 KV head: none of those can go), so its 18 layers have five MLP widths and two head
counts (``surgeon_gemma3_text``). ``opt-125m``: ``256 x (i mod 4)`` MLP channels and, in every third layer, one
of the 12 heads (``surgeon_opt``). Both are served by our vLLM plugin; the dense ones by stock vLLM. Then::

    python benchmarks/per_layer_shapes.py gemma3-270m /tmp/g270
    python -m benchmarks.vllm_parity --threads 1 --windows 2 \\
        --out benchmarks/results/vllm_parity_gemma3_270m_shapes.json dense=/tmp/g270/dense per-layer=/tmp/g270/per-layer
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from base.adapters import get_adapter
from base.loading import load_model
from base.surgery import LayerPlan, RemovalPlan
from benchmarks.streaming import gemma3_270m_config, synthetic_tokenizer, write_random
from export.pruned import ShrinkConfig, shrink_and_save


def opt_125m_config():
    """OPT-125m's config: 12 layers, hidden 768, 12 heads of 64, MLP 3072, a 50,272 vocabulary, tied embeddings."""
    from transformers import OPTConfig

    return OPTConfig(vocab_size=50272, hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12,
                     word_embed_proj_dim=768, max_position_embeddings=2048, do_layer_norm_before=True,
                     tie_word_embeddings=True, architectures=["OPTForCausalLM"], dtype="float32")


def gemma3_config():
    config = gemma3_270m_config()
    config.dtype = "float32"
    config.architectures = ["Gemma3ForCausalLM"]  # without it vLLM takes model_type gemma3_text for its embedding model
    return config


# name: (config, the per-layer plan of layer i, the tokenizer's vocabulary: None for the default model's)
MODELS = {
    "gemma3-270m": (gemma3_config, lambda i: LayerPlan.of(channels=range(128 * (i % 5)),
                                                           heads=[i % 4] if i % 3 == 0 else []), 262144),
    "opt-125m": (opt_125m_config, lambda i: LayerPlan.of(channels=range(256 * (i % 4)),
                                                         heads=[i % 12] if i % 3 == 0 else []), None),
}


def main(name: str, root: Path) -> None:
    make_config, layer_plan, vocab = MODELS[name]
    config = make_config()
    dense = write_random(config, root / "dense", dtype=torch.float32,
                         tokenizer=synthetic_tokenizer(vocab) if vocab else None)
    lm = load_model(dense)
    plan = RemovalPlan({i: layer_plan(i) for i in range(config.num_hidden_layers)})
    shrink_and_save(lm.model, lm.tokenizer, get_adapter(config.model_type), root / "per-layer",
                    ShrinkConfig(check_tokens=0), plan=plan)
    written = json.loads((root / "per-layer" / "config.json").read_text())
    sizes = {k: sorted(set(v)) for k, v in written.items() if k.startswith("layer_") and isinstance(v, list)}
    print(f"{root / 'per-layer'}: {sizes}")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
