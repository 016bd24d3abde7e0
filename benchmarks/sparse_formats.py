"""When do sparse linears beat dense ones? CSR on CPU, and 2:4 on CUDA when a GPU is present.

CPU: ``y = x W^T`` for ``W [out, in]`` in the default model's MLP shapes (1536x576: gate/up,
576x1536: down), ``x`` of 1 and 128 tokens, ``W`` under a seeded random unstructured mask at
50/70/80/90/95/99% sparsity: dense ``F.linear`` against :func:`runtime.sparse_linear.sparse_linear`
on the CSR ``W`` (exactly what the ``torch-csr`` backend runs), float32, one thread. Every
repetition times both, alternating which goes first, each over the same number of calls (enough for
the dense one to take about 20 ms); per cell the median of the repetitions, the ratio of medians
(CSR / dense: below 1 is faster) and the range of the paired per-repetition ratios.

CUDA (only when a GPU is visible): float16 dense ``F.linear`` against semi-structured 2:4 weights on
each kernel :func:`runtime.semi_structured.choose_backend` allows (cuSPARSELt, CUTLASS), in the
default model's shapes and a 7B model's (11008x4096, 4096x11008) from 1 to 4096 tokens, timed
with CUDA events after synchronising. Without a GPU that section reads ``skipped: no CUDA``.

Usage: ``python -m benchmarks.sparse_formats [--out benchmarks/results/sparse_formats.json] [--repeat 7]``
(JSON and a markdown table beside it, both written atomically).
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from base.env import environment
from base.files import write_file
from base.patterns import NMPattern
from benchmarks.latency import summarize
from runtime.semi_structured import (
    choose_backend,
    cuda_paired,
    to_semi_structured_linear,
    winning_tail,
)
from runtime.sparse_linear import sparse_linear

CPU_SHAPES = ((1536, 576), (576, 1536))  # W [out, in]: gate/up, down of SmolLM2-135M
CPU_TOKENS = (1, 128)
SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
CUDA_SHAPES = ((1536, 576), (576, 1536), (11008, 4096), (4096, 11008))  # default model, Llama-2-7B MLP
CUDA_TOKENS = (1, 16, 64, 512, 2048, 4096)  # decode-sized calls too: where does 2:4 start to win?
TARGET_SECONDS = 0.02  # per timed repetition of the dense linear


def _timed(fn: Callable[[], object], calls: int) -> float:
    """Seconds per call of ``fn`` over ``calls`` calls (CPU clock)."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def _paired(fns: dict[str, Callable[[], object]], repeat: int, calls: int) -> dict[str, list[float]]:
    """``repeat`` repetitions of every function, alternating the order, after one warm-up each."""
    names = list(fns)
    for name in names:
        _timed(fns[name], max(1, calls // 4))
    samples: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(repeat):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            samples[name].append(_timed(fns[name], calls))
    return samples


def measure_cpu(shapes: tuple[tuple[int, int], ...] = CPU_SHAPES, tokens: tuple[int, ...] = CPU_TOKENS,
                sparsities: tuple[float, ...] = SPARSITIES, repeat: int = 7, seed: int = 0) -> list[dict]:
    """One row per (shape, tokens, sparsity): dense and CSR seconds per call, ratio and paired range."""
    rows = []
    gen = torch.Generator().manual_seed(seed)
    for out_f, in_f in shapes:
        W_full = torch.randn(out_f, in_f, generator=gen)
        for n_tok in tokens:
            x = torch.randn(n_tok, in_f, generator=gen)  # [N, C]
            once = _timed(lambda: F.linear(x, W_full), 5)
            calls = max(1, math.ceil(TARGET_SECONDS / max(once, 1e-7)))
            for sparsity in sparsities:
                W = W_full * (torch.rand(out_f, in_f, generator=gen) >= sparsity)
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                    W_csr = W.to_sparse_csr()
                torch.testing.assert_close(sparse_linear(x, W_csr), F.linear(x, W), rtol=1e-4, atol=1e-4)
                s = _paired({"dense": lambda: F.linear(x, W), "csr": lambda: sparse_linear(x, W_csr)}, repeat, calls)
                paired = [c / d for c, d in zip(s["csr"], s["dense"])]
                dense, csr = summarize(s["dense"]), summarize(s["csr"])
                rows.append({"shape": [out_f, in_f], "tokens": n_tok, "sparsity": sparsity,
                             "measured_sparsity": float((W == 0).float().mean()), "calls_per_rep": calls,
                             "dense_s": dense.to_dict(), "csr_s": csr.to_dict(),
                             "ratio": csr.median / dense.median, "ratio_range": [min(paired), max(paired)]})
    return rows


def break_even(rows: list[dict]) -> list[dict]:
    """Per (shape, tokens): the lowest measured sparsity from which CSR is faster at every higher one."""
    out = []
    for key in dict.fromkeys((tuple(r["shape"]), r["tokens"]) for r in rows):
        cells = sorted((r for r in rows if (tuple(r["shape"]), r["tokens"]) == key), key=lambda r: r["sparsity"])
        start = winning_tail({r["sparsity"]: r["ratio"] < 1 for r in cells})
        shape = f"{key[0][0]}x{key[0][1]}"
        text = (f"CSR beats dense from {start:.0%} sparsity on" if start is not None
                else f"CSR never beats dense up to {cells[-1]['sparsity']:.0%}")
        out.append({"shape": list(key[0]), "tokens": key[1], "from_sparsity": start,
                    "statement": f"W {shape}, {key[1]} token(s): {text}"})
    return out


def measure_cuda(shapes: tuple[tuple[int, int], ...] = CUDA_SHAPES, tokens: tuple[int, ...] = CUDA_TOKENS,
                 repeat: int = 7, seed: int = 0) -> dict:
    """2:4 (each allowed kernel) vs dense float16 on the visible GPU, or ``{"status": "skipped: no CUDA"}``."""
    if not torch.cuda.is_available():
        return {"status": "skipped: no CUDA"}
    device = torch.device("cuda")
    capability = torch.cuda.get_device_capability(device)
    available = torch.backends.cusparselt.is_available()
    gen = torch.Generator(device=device).manual_seed(seed)
    rows = []
    for out_f, in_f in shapes:
        W = torch.randn(out_f, in_f, generator=gen, device=device, dtype=torch.float16)
        W = W * NMPattern().mask_from_scores(torch.rand(out_f, in_f, generator=gen, device=device))
        for n_tok in tokens:
            x = torch.randn(n_tok, in_f, generator=gen, device=device, dtype=torch.float16)
            fns: dict[str, Callable[[], object]] = {"dense": lambda: F.linear(x, W)}
            skipped = {}
            for kernel in ("cusparselt", "cutlass"):
                d = choose_backend(capability, torch.float16, (out_f, in_f), cusparselt=available, prefer=kernel)  # type: ignore[arg-type]
                if d.kernel == "dense":
                    skipped[kernel] = d.reason
                    continue
                linear = nn.Linear(in_f, out_f, bias=False, device=device, dtype=torch.float16)
                linear.weight = nn.Parameter(W.clone(), requires_grad=False)
                module = to_semi_structured_linear(linear, d)
                torch.testing.assert_close(module(x), F.linear(x, W), rtol=1e-2, atol=1e-1)
                fns[kernel] = partial(module, x)
            samples = cuda_paired(fns, repeat)
            stats = {k: summarize(v).to_dict() for k, v in samples.items()}
            rows.append({"shape": [out_f, in_f], "tokens": n_tok, "seconds": stats, "skipped": skipped,
                         "speedup": {k: stats["dense"]["median"] / s["median"] for k, s in stats.items() if k != "dense"}})
    return {"status": "ok", "environment": environment(device, torch.float16), "capability": list(capability),
            "cusparselt_available": available, "rows": rows}


def markdown(result: dict) -> str:
    """The CPU table, the break-even statements and the CUDA section."""
    env = result["environment"]
    lines = [
        "# Sparse formats: CSR vs dense linear (CPU), 2:4 vs dense (CUDA)", "",
        f"{env['device']}, torch {env['torch']}, {env['threads']} thread(s), float32, {env['date']}, "
        f"commit {env['git_commit']}. `python -m benchmarks.sparse_formats`; medians of "
        f"{result['config']['repeat']} paired repetitions; ratio = CSR / dense time (below 1: CSR faster), "
        "range of the per-repetition ratios in brackets.", "",
        "| W [out, in] | tokens | " + " | ".join(f"{s:.0%}" for s in result["config"]["sparsities"]) + " |",
        "| --- | --- | " + " | ".join("---" for _ in result["config"]["sparsities"]) + " |",
    ]
    rows = result["cpu_csr"]["rows"]
    for key in dict.fromkeys((tuple(r["shape"]), r["tokens"]) for r in rows):
        cells = [r for r in rows if (tuple(r["shape"]), r["tokens"]) == key]
        lines.append(f"| {key[0][0]}x{key[0][1]} | {key[1]} | " + " | ".join(
            f"{r['ratio']:.2f} [{r['ratio_range'][0]:.2f}, {r['ratio_range'][1]:.2f}]" for r in cells) + " |")
    lines += ["", "Break-even:", ""] + [f"- {b['statement']}" for b in result["cpu_csr"]["break_even"]]
    cuda = result["cuda_24"]
    lines += ["", "## 2:4 on CUDA (float16)", ""]
    if cuda["status"] != "ok":
        lines.append(cuda["status"])
    else:
        lines += [f"{cuda['environment']['device']} (sm{cuda['capability'][0]}{cuda['capability'][1]}); "
                  "speed-up = dense time / 2:4 time.", "",
                  "| W [out, in] | tokens | dense ms | cuSPARSELt speed-up | CUTLASS speed-up |", "| --- | --- | --- | --- | --- |"]
        for r in cuda["rows"]:
            sp = [f"{r['speedup'][k]:.2f}" if k in r["speedup"] else "n/a" for k in ("cusparselt", "cutlass")]
            lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['tokens']} | "
                         f"{1e3 * r['seconds']['dense']['median']:.3f} | {sp[0]} | {sp[1]} |")
    return "\n".join(lines) + "\n"


def run(repeat: int = 7, seed: int = 0, threads: int = 1) -> dict:
    """Both sections, with the environment they ran in."""
    torch.set_num_threads(threads)
    rows = measure_cpu(repeat=repeat, seed=seed)
    return {
        "kind": "surgeon-export sparse formats benchmark", "schema_version": 1,
        "environment": environment("cpu", torch.float32),
        "config": {"cpu_shapes": [list(s) for s in CPU_SHAPES], "cpu_tokens": list(CPU_TOKENS),
                   "sparsities": list(SPARSITIES), "cuda_shapes": [list(s) for s in CUDA_SHAPES],
                   "cuda_tokens": list(CUDA_TOKENS), "repeat": repeat, "seed": seed, "threads": threads},
        "cpu_csr": {"rows": rows, "break_even": break_even(rows)},
        "cuda_24": measure_cuda(repeat=repeat, seed=seed),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sparse_formats.json"))
    parser.add_argument("--repeat", type=int, default=7, help="timed repetitions per cell (at least 5)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.repeat < 5:
        parser.error("--repeat must be at least 5 (the protocol's minimum)")
    result = run(repeat=args.repeat, threads=args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(result)
    write_file(args.out.with_suffix(".md"), text)
    write_file(args.out, json.dumps(result, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
