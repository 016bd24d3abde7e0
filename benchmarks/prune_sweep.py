"""The pruning sweep: methods x targets on the protocol, one subprocess per cell.

Each cell runs ``surgeon-export prune ... --json`` in its own process (so its peak resident memory
is its own) and records perplexity, measured sparsity, prune time and peak memory. Results go to
``benchmarks/results/prune_sweep.json`` and a markdown table beside it, written atomically and
after every cell, so an interrupted sweep keeps the cells it finished and ``--resume`` skips them.

When the results go to ``benchmarks/results/prune_runs/`` (the default), the summary over every
recorded run (:mod:`benchmarks.prune_report`: ``SUMMARY.md`` and ``ppl_vs_size.png``) is rewritten
after every cell too, so one command regenerates the protocol sweep with its tables and plots.

Usage::

    python -m benchmarks.prune_sweep --preset protocol --resume     # the whole sweep, hours on 2 cores
    python -m benchmarks.prune_sweep --preset structured --threads 2
    python -m benchmarks.prune_sweep --cells "sparsegpt:0.5,surgeon:2:4,wanda:2:4+sds,surgeon:s0.8@uniform"
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import prune_report
from benchmarks.env import environment

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = RESULTS / "prune_runs"
SCHEMA_VERSION = 1

PRESETS: dict[str, list[str]] = {
    "unstructured": [f"{m}:{t}" for t in ("0.5", "2:4", "0.6") for m in ("magnitude", "wanda", "sparsegpt", "surgeon")],
    # Every method removes the same MLP channels in every layer (the reference channel baseline's
    # allocation), so the scores and updates are compared on exactly the same coupled groups.
    "structured": [f"{m}:s{r}@uniform" for r in ("0.9", "0.8", "0.7", "0.6", "0.5") for m in ("magnitude", "wanda", "surgeon")],
    "sds": [f"{m}:{t}{r}" for t in ("2:4", "0.5") for m in ("sparsegpt", "wanda") for r in ("", "+sds")],
}
PRESETS["protocol"] = PRESETS["unstructured"] + PRESETS["structured"] + [c for c in PRESETS["sds"] if c.endswith("+sds")]


def cell_args(cell: str) -> list[str]:
    """``"sparsegpt:0.5"`` / ``"surgeon:2:4"`` / ``"wanda:s0.8"`` (structured, 80% kept) -> CLI options;
    a ``+sds`` suffix adds SDS refinement (``"wanda:2:4+sds"``), an ``@uniform`` / ``@global`` suffix
    the allocation (``"surgeon:s0.8@uniform"``)."""
    if "@" in cell:
        cell, allocation = cell.rsplit("@", 1)
        return [*cell_args(cell), "--allocation", allocation]
    if cell.endswith("+sds"):
        return [*cell_args(cell.removesuffix("+sds")), "--refine", "sds"]
    method, target = cell.split(":", 1)
    if target.startswith("s"):
        return ["--method", method, "--structured", target[1:]]
    if ":" in target:
        return ["--method", method, "--pattern", target]
    return ["--method", method, "--sparsity", target]


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [
        f"Pruning sweep on {results['model']} ({env['device']}, torch {env['torch']}, transformers "
        f"{env['transformers']}, {env['threads']} threads, {env['date']}, commit {env['git_commit']}).",
        "",
        "| cell | perplexity | measured sparsity | prune s | total s | peak RSS MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for cell, r in results["cells"].items():
        if "error" in r:
            lines.append(f"| {cell} | failed: {r['error']} | | | | |")
            continue
        lines.append(
            f"| {cell} | {r['perplexity']:.2f} | {r['sparsity']:.2%} | {r['prune_seconds']:.0f} | "
            f"{r['wall_seconds']:.0f} | {r['peak_rss_mib']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def run_cell(cell: str, extra: list[str], threads: int) -> dict:
    cmd = [sys.executable, "-m", "surgeon.cli", "prune", *cell_args(cell), "--json", "--quiet",
           "--threads", str(threads), *extra]
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1], "command": cmd[2:]}
    payload = json.loads(out.stdout)
    return {
        "perplexity": payload["perplexity"]["perplexity"],
        "sparsity": payload["sparsity"],
        "prune_seconds": payload["seconds"],
        "wall_seconds": wall,
        "peak_rss_mib": payload["peak_rss_mib"],
        "calibration": payload["calibration"],
        "config": payload["config"],
        "shots": payload.get("shots"),
        "refine": payload.get("refine"),
        "layer_seconds": payload.get("layer_seconds"),
        "command": cmd[2:],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS))
    parser.add_argument("--cells", help="comma-separated cells, e.g. sparsegpt:0.5,surgeon:2:4,wanda:s0.8")
    parser.add_argument("--out", type=Path, default=RUNS / "prune_sweep.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resume", action="store_true", help="skip cells already in --out")
    parser.add_argument("extra", nargs="*", help="further options passed to every prune command (after --)")
    args = parser.parse_args(argv)
    cells = PRESETS[args.preset] if args.preset else []
    if args.cells:
        cells += [c.strip() for c in args.cells.split(",") if c.strip()]
    if not cells:
        parser.error("give --preset or --cells")
    results = {"schema_version": SCHEMA_VERSION, "model": "SmolLM2-135M-Instruct (default)", "cells": {}}
    if args.resume and args.out.is_file():
        results = json.loads(args.out.read_text())
    results["environment"] = environment()
    results["environment"]["threads"] = args.threads
    for cell in cells:
        if cell in results["cells"] and "error" not in results["cells"][cell]:
            continue
        print(f"[sweep] {cell} ...", file=sys.stderr, flush=True)
        results["cells"][cell] = run_cell(cell, args.extra, args.threads)
        print(f"[sweep] {cell}: {results['cells'][cell].get('perplexity', results['cells'][cell].get('error'))}",
              file=sys.stderr, flush=True)
        write_atomic(args.out, json.dumps(results, indent=2))
        write_atomic(args.out.with_suffix(".md"), markdown(results))
        if args.out.parent.resolve() == RUNS.resolve():
            prune_report.main(["--runs", str(RUNS)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
