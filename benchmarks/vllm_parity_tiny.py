"""vLLM against torch on tiny models of tests/test_vllm.py, per-layer through our plugin beside the dense tiny
model of the same family through stock vLLM (how far vLLM's own class is from transformers, which sets that
test's bound for the family)::

    python -m benchmarks.vllm_parity_tiny gemma /tmp/tiny-gemma benchmarks/results/vllm_parity_tiny_gemma.json
    python -m benchmarks.vllm_parity_tiny opt /tmp/tiny-opt benchmarks/results/vllm_parity_tiny_opt.json

``gemma``: per-layer Gemma, Gemma2 and Gemma3 and the dense Gemma; ``opt``: per-layer OPT (MLP widths and heads
removed) and the dense OPT.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from base.env import environment
from benchmarks import vllm_parity
from runtime.generate import GenerationConfig, generate
from tests.conftest import make_tokenizer
from tests.families import make_model
from tests.test_vllm import (
    GEMMAS,
    NEW_TOKENS,
    OPT_PLAN,
    OPT_SHAPE,
    PER_LAYER_PLAN,
    PROMPTS,
    SHAPE,
    WINDOW,
    per_layer,
    save,
    torch_reference,
)

FAMILIES = {"gemma": (GEMMAS, PER_LAYER_PLAN, SHAPE), "opt": (("opt",), OPT_PLAN, OPT_SHAPE)}


def main(which: str, root: Path, out: Path) -> None:
    families, plan, shape = FAMILIES[which]
    tok = make_tokenizer(vocab_size=320)
    root.mkdir(parents=True, exist_ok=True)
    models = {f"{family} per-layer": per_layer(family, tok, root, plan, **shape) for family in families}
    models[f"{which} dense (stock vLLM)"] = save(make_model(which, dtype=torch.float32, vocab_size=len(tok), **shape),
                                                 tok, root / f"{which}-dense")
    replies = vllm_parity.served({"models": [str(p) for p in models.values()], "prompts": PROMPTS, "window": WINDOW,
                                  "new_tokens": NEW_TOKENS, "full": True, "threads": 1,
                                  "ppl": {"ids": WINDOW * 3, "seq_len": len(WINDOW), "windows": None}})
    rows = []
    for (label, path), got in zip(models.items(), replies):
        ref = torch_reference(path)
        expected = torch.log_softmax(ref.logits(torch.tensor([WINDOW]))[0], dim=-1)
        rows.append({"model": label, "architecture": got["describe"]["vllm"]["architecture"],
                     "greedy_identical": got["greedy"] == generate(ref, PROMPTS, GenerationConfig(max_new_tokens=NEW_TOKENS)).tokens,
                     "max_abs_logprob_difference": float((torch.tensor(got["logprobs"]) - expected).abs().max())})
        print(rows[-1], flush=True)
    out.write_text(json.dumps({"kind": f"vllm parity, tiny {which} models", "environment": environment(), "threads": 1,
                               "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
