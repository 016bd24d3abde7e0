"""Peak memory and time of LLM Surgeon's K-FAC pass against its batch size (``prune --kfac-batch``).

Each batch size runs in its own process (so that each peak RSS is its own): the default model, the
calibration windows ``prune`` uses, :func:`surgeon.calibrate.kfac_factors`, one thread. Reported per
batch size: seconds, peak RSS (``ru_maxrss``, the whole process: model and factors included), and
the largest relative difference of every factor from those of the first batch size (the factors are
sums over windows, so they agree up to float rounding).

Usage: ``python -m benchmarks.kfac_memory [--batches 4,1] [--windows 8] [--out benchmarks/results/kfac_memory.json]``
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from base.env import environment
from base.files import write_file


def measure(batch: int, windows: int, factors_out: Path) -> dict:
    """In this process: K-FAC over ``windows`` calibration windows in batches of ``batch``."""
    from safetensors.torch import save_file

    from base.data import calibration_windows
    from base.loading import load_model
    from surgeon.calibrate import kfac_factors

    torch.set_num_threads(1)
    lm = load_model(None)
    ids = calibration_windows(lm.model, lm.tokenizer, n=windows, seq_len=512).ids
    start = time.perf_counter()
    factors = kfac_factors(lm.model, lm.adapter, ids, batch_size=batch)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    unique: dict[int, tuple[str, torch.Tensor]] = {}  # linears of one input group share their A
    for n, f in factors.items():
        for k in ("A", "G"):
            unique.setdefault(getattr(f, k).data_ptr(), (f"{n}.{k}", getattr(f, k)))
    save_file({name: t.contiguous() for name, t in unique.values()}, str(factors_out))
    return {"batch": batch, "windows": windows, "seconds": seconds, "peak_rss_bytes": peak}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="4,1")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/kfac_memory.json"))
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one batch size
    parser.add_argument("--factors", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(measure(args.one, args.windows, args.factors)))
        return 0
    from safetensors.torch import load_file

    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        parser.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if min(batches) < 1 or args.windows < 1:
        parser.error("--batches and --windows must be at least 1")
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for batch in batches:
            path = Path(tmp) / f"b{batch}.safetensors"
            proc = subprocess.run([sys.executable, "-m", "benchmarks.kfac_memory", "--one", str(batch),
                                   "--windows", str(args.windows), "--factors", str(path)],
                                  capture_output=True, text=True, check=True)
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            factors = load_file(str(path))
            reference = reference or factors
            row["max_rel_diff_vs_first"] = max(float((factors[k] - v).abs().max() / v.abs().max()) for k, v in reference.items())
            rows.append(row)
            print(row, flush=True)
    result = {"kind": "K-FAC batch size", "environment": {**environment("cpu"), "threads": 1}, "rows": rows}
    lines = ["# K-FAC pass: batch size against peak memory and time", "",
             f"{result['environment']['device']}; torch {torch.__version__}; float32 model, float64 factors; one thread; "
             f"default model, {args.windows} windows of 512 tokens; commit {result['environment']['git_commit']}.", "",
             "| windows per pass | seconds | peak RSS | factors vs first (max rel. diff) |", "| ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['batch']} | {r['seconds']:.1f} | {r['peak_rss_bytes'] / 2**30:.2f} GiB | {r['max_rel_diff_vs_first']:.1e} |"
              for r in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_file(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    write_file(args.out, json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
