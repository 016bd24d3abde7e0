"""Run in vLLM's environment by tests/test_vllm.py: each model directory given on the command line
loaded on the ``vllm`` backend, one JSON line per model on stdout (greedy and sampled tokens,
full-vocabulary log-probabilities of the last position, each token's log-probability, perplexity,
``describe``).

Usage: ``python -m tests.vllm_probe REQUEST.json`` where the request holds ``models``, ``prompts``,
``window`` and ``new_tokens``.
"""

from __future__ import annotations

import json
import os
import sys

import torch


def main() -> None:
    request = json.loads(open(sys.argv[1]).read())
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # vLLM's prints go to stderr; stdout carries the replies only
    from base.errors import SurgeonError
    from base.perplexity import perplexity
    from runtime.backend import load_backend
    from runtime.generate import GenerationConfig, generate

    for path in request["models"]:
        try:
            backend = load_backend("vllm", path, threads=1)
        except SurgeonError as exc:  # a refused model: its one line
            replies.write(json.dumps({"path": path, "error": str(exc)}) + "\n")
            replies.flush()
            continue
        prompts = request["prompts"]
        greedy = generate(backend, prompts, GenerationConfig(max_new_tokens=request["new_tokens"]))
        sampled = [generate(backend, prompts, GenerationConfig(max_new_tokens=8, do_sample=True, top_k=20, seed=s)).tokens
                   for s in (0, 0, 1)]
        window = torch.tensor([request["window"]])
        backend.reset(1)
        last = backend.forward(window, torch.ones_like(window), torch.arange(window.shape[1])[None], last_only=True)
        ppl = perplexity(backend, torch.tensor(request["window"] * 3), seq_len=len(request["window"]), progress=False)
        replies.write(json.dumps({
            "path": path, "greedy": greedy.tokens, "sampled": sampled, "last_logprobs": last[0, -1].tolist(),
            "token_logprobs": backend.token_logprobs(window)[0].tolist(), "logprobs": backend.logits(window)[0].tolist(),
            "perplexity": ppl.perplexity, "describe": backend.describe(),
        }) + "\n")
        replies.flush()
        del backend


if __name__ == "__main__":
    main()
