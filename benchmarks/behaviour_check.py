"""Behaviour unchanged across a refactor: the same commands on two source trees, their numbers side by side.

Runs each cell's ``surgeon-export`` command (``--json``, ``--threads 1``, the default model) with
``PYTHONPATH`` set to a source tree, once per tree, and records every number that should not move:
the main job's perplexities and ONNX parity, Wanda 50%, SparseGPT 2:4, a streamed Wanda run.
A git worktree of the commit before the refactor is the "before" tree::

    git worktree add /tmp/before <commit>
    python3 benchmarks/behaviour_check.py --before /tmp/before --after . \\
        --out benchmarks/results/behaviour_check.json

``--only before`` (or ``after``) runs one side and keeps the other from an existing ``--out``, so the
two sides can run at different times on the same machine. Cells run one at a time.
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

CELLS = {
    "main job (run --no-runtimes --no-onnx: prune, smaller model, bench)": ["run", "--no-runtimes", "--no-onnx", "--out",
                                                                           "{tmp}/run"],
    "Wanda 50% (prune --method wanda --sparsity 0.5)": ["prune", "--method", "wanda", "--sparsity", "0.5"],
    "SparseGPT 2:4 (prune --method sparsegpt --pattern 2:4)": ["prune", "--method", "sparsegpt", "--pattern", "2:4"],
    "streamed Wanda 50% (prune --streaming --out)": ["prune", "--method", "wanda", "--sparsity", "0.5", "--streaming",
                                                      "--no-check-streaming", "--out", "{tmp}/streamed"],
    "ONNX export of the default model (onnx --out)": ["onnx", "--out", "{tmp}/onnx"],
}


def numbers(cell: str, result: dict) -> dict:
    """The numbers of one cell's JSON result that a refactor must not change."""
    if cell.startswith("main job"):
        rows = {r["label"]: r for r in result["benchmark"]["models"]}
        return {"remaining_fraction": result["remaining_fraction"],
                **{f"{label} perplexity": row["perplexity"]["perplexity"] for label, row in rows.items()
                   if row.get("perplexity")}}
    if cell.startswith("ONNX"):
        return {"largest logit difference ONNX Runtime vs torch": result["verification"]["max_abs_diff"],
                "bytes_on_disk": result["bytes_on_disk"]}
    return {"perplexity": result["perplexity"]["perplexity"], "sparsity": result["sparsity"]}


def run_tree(tree: Path) -> dict:
    cells = {}
    env = {**os.environ, "PYTHONPATH": str(tree.absolute()), "OMP_NUM_THREADS": "1"}
    for cell, argv in CELLS.items():
        with tempfile.TemporaryDirectory() as tmp:
            args = [a.format(tmp=tmp) for a in argv]
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "surgeon_export", *args, "--json", "--threads", "1", "--quiet"],
                                  env=env, cwd=tmp, capture_output=True, text=True)
            seconds = time.perf_counter() - start
        if done.returncode != 0:
            cells[cell] = {"error": done.stderr.strip().splitlines()[-1:], "seconds": round(seconds)}
            continue
        result = json.loads(done.stdout)
        try:
            cells[cell] = {**numbers(cell, result), "seconds": round(seconds)}
        except (KeyError, TypeError) as exc:  # keep the run's output: minutes of work
            cells[cell] = {"error": f"unread result ({exc!r})", "result": result, "seconds": round(seconds)}
        print(f"{tree}: {cell}: {cells[cell]}", flush=True)
    commit = subprocess.run(["git", "-C", str(tree), "describe", "--always", "--dirty"], capture_output=True,
                            text=True).stdout.strip()
    return {"tree": str(tree), "commit": commit, "cells": cells}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, required=True)
    parser.add_argument("--only", choices=("before", "after"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    record = json.loads(args.out.read_text()) if args.only and args.out.exists() else {}
    for side in ("before", "after"):
        if args.only in (None, side):
            record[side] = run_tree(getattr(args, side))
    if "before" in record and "after" in record:
        record["same"] = {cell: {k: record["before"]["cells"][cell].get(k) == v
                                 for k, v in record["after"]["cells"][cell].items() if k != "seconds"}
                          for cell in CELLS if cell in record["after"]["cells"] and cell in record["before"]["cells"]}
    import torch  # the environment of the run, for the record

    record["environment"] = {"python": sys.version.split()[0], "torch": torch.__version__, "threads": 1,
                             "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    from base.files import write_file

    write_file(args.out, json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
