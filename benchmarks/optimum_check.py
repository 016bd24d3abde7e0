"""Does optimum's ``ORTModelForCausalLM`` run our ONNX exports? A standalone script (no project imports).

optimum-onnx 0.1.0 (the package that holds ``optimum.onnxruntime``) pins ``transformers<4.58`` and
``optimum~=2.1.0`` and does not import with this project's transformers 5, so the check runs in a
separate virtual environment that shadows only those packages (benchmarks/results/optimum_check.md
has the exact commands). For each export directory it loads the graph with
``ORTModelForCausalLM.from_pretrained`` (no code from the directory is run), greedily generates
``--new-tokens`` tokens after ``--prompt-ids`` and prints one JSON line per directory: the tokens,
or the error.

    python benchmarks/optimum_check.py --prompt-ids 1,2,3 --new-tokens 32 DIR [DIR ...]
"""

from __future__ import annotations

import argparse
import json
from importlib import metadata


def check(directory: str, prompt: list[int], new_tokens: int) -> dict:
    """Tokens ORTModelForCausalLM generates greedily from ``directory``, or the first line of its error."""
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    try:
        model = ORTModelForCausalLM.from_pretrained(directory, use_cache=True, trust_remote_code=False)
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             min_new_tokens=new_tokens)
        return {"dir": directory, "ok": True, "tokens": out[0, len(prompt):].tolist()}
    except Exception as exc:  # the point is to record what optimum says
        return {"dir": directory, "ok": False, "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+")
    parser.add_argument("--prompt-ids", required=True, help="comma-separated token ids")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    prompt = [int(t) for t in args.prompt_ids.split(",")]
    versions = {p: metadata.version(p) for p in ("optimum", "optimum-onnx", "transformers", "onnxruntime", "torch")}
    for directory in args.dirs:
        print(json.dumps({**check(directory, prompt, args.new_tokens), "versions": versions}))


if __name__ == "__main__":
    main()
