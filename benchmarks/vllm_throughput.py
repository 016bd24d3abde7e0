"""What vLLM exists for: throughput under concurrent requests, dense against pruned on one engine build.

For every model (``LABEL=PATH``, ``default`` for the default model) one vLLM engine (the ``vllm``
backend, :mod:`runtime.vllm`: float32, eager, the same settings for all) and, per concurrency N
(1, 8, 32 by default), N requests of a synthetic ``--prompt-len``-token prompt (random ids, seeded,
the same for every model) submitted at once, each generating ``--new-tokens`` greedy tokens with no
stop token. Per cell: generated tokens/s (all requests' tokens over the wall time from submission to
the last token) and time to first token (median and largest over the requests), median over
``--repeat`` repetitions after one untimed warm-up; repetitions interleave between models, as in
``bench``. Every model after the first gets its ratios to the first and its FLOP ratio
(:mod:`export.flops`, at the prompt length), which the speed-ups are read against.

    python -m benchmarks.vllm_throughput --threads 2 --out benchmarks/results/vllm_throughput.json \\
        dense=default uniform=out/wanda-s80 per-layer=out/wanda-s80-global

Runs in vLLM's environment (``surgeon-export vllm-setup``); started elsewhere, it re-runs itself there.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict
from pathlib import Path

import torch

from base.env import environment
from benchmarks.latency import synthetic_prompt
from runtime.vllm_env import VLLM_VERSION, backend_python, rerun


def flops_at(artefact: dict, length: int) -> float:
    """FLOPs per token at the context length nearest ``length`` in the artefact's table."""
    table = {int(k): v for k, v in artefact["flops_per_token"].items()}
    return table[min(table, key=lambda k: abs(k - length))]


def measure(models: dict[str, str], concurrency: list[int], prompt_len: int, new_tokens: int, repeat: int,
            threads: int) -> dict:
    """Every model's cells; see the module docstring."""
    from runtime.backend import load_backend
    from runtime.vllm import throughput

    backends = {label: load_backend("vllm", spec, threads=threads) for label, spec in models.items()}
    vocab = min(b.vocab_size for b in backends.values())
    prompts = {n: synthetic_prompt(n, prompt_len, vocab, seed=n) for n in concurrency}
    for backend in backends.values():  # warm-up: every cell once, untimed
        for n in concurrency:
            throughput(backend, prompts[n], new_tokens)
    samples: dict[str, dict[int, list]] = {label: {n: [] for n in concurrency} for label in backends}
    labels = list(backends)
    for r in range(repeat):
        for i in range(len(labels)):
            label = labels[(r + i) % len(labels)]
            for n in concurrency:
                samples[label][n].append(throughput(backends[label], prompts[n], new_tokens))
    out = []
    for label, backend in backends.items():
        cells = []
        for n in concurrency:
            runs = samples[label][n]
            cells.append({"concurrency": n, "prompt_tokens": prompt_len, "new_tokens": new_tokens,
                          "tokens_per_s": statistics.median(t.tokens_per_second for t in runs),
                          "ttft_median_s": statistics.median(t.ttft_median for t in runs),
                          "ttft_max_s": statistics.median(t.ttft_max for t in runs),
                          "samples": [asdict(t) for t in runs]})
        out.append({"label": label, "spec": models[label], "artefact": backend.describe(), "cells": cells})
    base = out[0]
    for entry in out[1:]:
        entry["ratios"] = {
            "flops": flops_at(entry["artefact"], prompt_len) / flops_at(base["artefact"], prompt_len),
            "cells": {str(c["concurrency"]): {"tokens_per_s": c["tokens_per_s"] / b["tokens_per_s"],
                                               "ttft": c["ttft_median_s"] / b["ttft_median_s"]}
                      for c, b in zip(entry["cells"], base["cells"])},
        }
    return {"kind": "vllm_throughput", "environment": {**environment("cpu"), "vllm": VLLM_VERSION},
            "config": {"concurrency": concurrency, "prompt_len": prompt_len, "new_tokens": new_tokens,
                       "repeat": repeat, "threads": threads}, "models": out}


def markdown(result: dict) -> str:
    """The result as a table: tokens/s and TTFT per model and concurrency, ratios to the first model."""
    env, cfg = result["environment"], result["config"]
    lines = [f"# vLLM throughput under concurrent requests ({env['device']}, {cfg['threads']} threads, vLLM "
             f"{env['vllm']}, torch {env['torch']}, transformers {env['transformers']})", "",
             f"Prompt {cfg['prompt_len']} tokens, {cfg['new_tokens']} greedy tokens per request, median of "
             f"{cfg['repeat']}; ratios are to `{result['models'][0]['label']}` (speed-up: >1 is faster).", "",
             "| model | arch | FLOP ratio | concurrency | tokens/s | TTFT median (s) | TTFT max (s) | speed-up | TTFT ratio |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in result["models"]:
        ratios = m.get("ratios")
        flops = f"{ratios['flops']:.3f}" if ratios else "1"
        for c in m["cells"]:
            r = ratios["cells"][str(c["concurrency"])] if ratios else {"tokens_per_s": 1.0, "ttft": 1.0}
            lines.append(f"| {m['label']} | {m['artefact']['vllm']['architecture']} | {flops} | {c['concurrency']} | "
                         f"{c['tokens_per_s']:.1f} | {c['ttft_median_s']:.3f} | {c['ttft_max_s']:.3f} | "
                         f"{r['tokens_per_s']:.3f} | {r['ttft']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="LABEL=PATH (PATH a model directory or 'default')")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    python = backend_python()
    if python is not None:
        rerun(python, "benchmarks.vllm_throughput")
    models = dict(m.split("=", 1) for m in args.models)
    torch.set_num_threads(args.threads)
    result = measure({k: (None if v == "default" else v) for k, v in models.items()},
                     [int(n) for n in args.concurrency.split(",")], args.prompt_len, args.new_tokens, args.repeat,
                     args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
