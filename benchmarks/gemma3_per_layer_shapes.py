"""Gemma3-270m's shapes (seeded random float32 weights) dense and per-layer, for the vLLM parity run on real shapes.

The per-layer checkpoint removes ``128 x (i mod 5)`` MLP channels and, in every third layer, one of the 4
query heads (1 KV head: none of those can go), so its 18 layers have five MLP widths and two head counts
(``surgeon_gemma3_text``, served by our vLLM plugin). Then::

    python benchmarks/gemma3_per_layer_shapes.py /tmp/g270
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


def main(root: Path) -> None:
    config = gemma3_270m_config()
    config.dtype = "float32"
    config.architectures = ["Gemma3ForCausalLM"]  # without it vLLM takes model_type gemma3_text for its embedding model
    dense = write_random(config, root / "dense", dtype=torch.float32, tokenizer=synthetic_tokenizer(262144))
    lm = load_model(dense)
    plan = RemovalPlan({i: LayerPlan.of(channels=range(128 * (i % 5)), heads=[i % 4] if i % 3 == 0 else [])
                        for i in range(config.num_hidden_layers)})
    shrink_and_save(lm.model, lm.tokenizer, get_adapter("gemma3_text"), root / "per-layer", ShrinkConfig(check_tokens=0),
                    plan=plan)
    written = json.loads((root / "per-layer" / "config.json").read_text())
    print(f"{root / 'per-layer'}: MLP widths {sorted(set(written['layer_intermediate_sizes']))}, "
          f"query heads {sorted(set(written['layer_num_attention_heads']))}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
