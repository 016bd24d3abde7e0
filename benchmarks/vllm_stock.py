"""Stock vLLM on a model directory, with nothing of surgeon-export: greedy tokens and log-probabilities.

What a user without our package runs on a checkpoint we wrote in the Nemotron-NAS layout
(``shrink --layout nemotron-nas``): ``vllm.LLM(model=DIR, trust_remote_code=True)``. This file imports
vLLM and the standard library only, turns vLLM's plugins off (``VLLM_PLUGINS=""``: our entry point
``surgeon`` is not loaded even where surgeon-export is installed beside vLLM) and reports every module
of ours that was imported anyway (``ours_imported``: the callers require it to be empty). Run it by
path in isolated mode with vLLM's Python, so neither ``PYTHONPATH`` nor this checkout is on the path:

    VLLM_ENV/bin/python -I benchmarks/vllm_stock.py REQUEST.json

``REQUEST.json``: ``model`` (directory), ``prompts`` (token ids), ``new_tokens``, ``window`` (token
ids: each token's log-probability, ``last_logprobs`` over the vocabulary after it, and with ``full``
every position's), ``windows`` (token-id windows: each token's log-probability, for perplexity),
``threads``, ``max_model_len``, ``kv_cache_bytes``, ``ours`` (our top-level package names). One JSON
object on stdout. :func:`benchmarks.vllm_parity.served_stock` runs it and compares with torch.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["VLLM_PLUGINS"] = ""  # no general plugin at all: ours would serve per-layer checkpoints otherwise
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # the given threads, no core pinning


def dense(entry: dict, vocab: int) -> list[float]:
    """One position's ``{token id: Logprob}`` as a list over the vocabulary (-inf where absent)."""
    out = [float("-inf")] * vocab
    for token, logprob in entry.items():
        out[token] = logprob.logprob
    return out


def own(entries: list, ids: list[int]) -> list[float]:
    """Each token's log-probability after the ones before it (prompt log-probs; position 0 has none)."""
    return [entries[i][ids[i]].logprob for i in range(1, len(ids))]


def main(request: dict) -> dict:
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    torch.set_num_threads(request["threads"])
    llm = LLM(model=request["model"], trust_remote_code=True, dtype="float32", seed=0, enforce_eager=True,
              enable_prefix_caching=False, max_logprobs=-1, max_model_len=request["max_model_len"],
              kv_cache_memory_bytes=request["kv_cache_bytes"], disable_log_stats=True)
    vocab = llm.llm_engine.model_config.get_vocab_size()

    def run(prompts: list[list[int]], params: SamplingParams) -> list:
        return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)

    greedy = run(request["prompts"], SamplingParams(temperature=0.0, max_tokens=request["new_tokens"],
                                                    ignore_eos=True, detokenize=False))
    window = request["window"]
    full = request.get("full", False)
    [scored] = run([window], SamplingParams(temperature=0.0, max_tokens=1, logprobs=-1, detokenize=False,
                                            prompt_logprobs=-1 if full else 0))
    windows = run(request["windows"], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0,
                                                     detokenize=False)) if request["windows"] else []
    last = dense(scored.outputs[0].logprobs[0], vocab)
    config = llm.llm_engine.model_config.hf_config
    ours = set(request["ours"])
    return {
        "path": request["model"],
        "greedy": [list(o.outputs[0].token_ids) for o in greedy],
        "last_logprobs": last,
        "token_logprobs": own(scored.prompt_logprobs, window),
        "logprobs": [dense(e, vocab) for e in scored.prompt_logprobs[1:]] + [last] if full else None,
        "window_logprobs": [own(o.prompt_logprobs, w) for o, w in zip(windows, request["windows"])],
        "describe": {"vllm": {"version": vllm.__version__, "architecture": (config.architectures or ["?"])[0],
                              "config_class": f"{type(config).__module__}.{type(config).__name__}",
                              "plugins": os.environ["VLLM_PLUGINS"]},
                     "ours_imported": sorted(m for m in sys.modules if m.split(".")[0] in ours)},
    }


if __name__ == "__main__":
    reply = main(json.loads(open(sys.argv[1]).read()))
    sys.stdout.write(json.dumps(reply) + "\n")
