"""Record the main job: ``surgeon-export run`` as the README's first command runs it, timed from outside.

Runs the command in a fresh output directory, measures its wall clock and peak RSS (of the command and
its benchmark workers: ``RUSAGE_CHILDREN``), and writes ``main_job.json`` (the command, the wall clock,
where the time went per stage and per benchmark row, the job's own result) and ``main_job.md`` (the
wall clock, the stages, then the benchmark's markdown)::

    python3 benchmarks/main_job.py --out benchmarks/results/main_job.json [-- extra run options]

The README's main-job time and figures come from this file (tests/test_readme_figures.py checks them).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from base.env import environment  # the machine and versions of the record
from base.files import write_file
from benchmarks.report import markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the result JSON; the .md goes beside it")
    parser.add_argument("--note", default="", help="what the machine was doing (quiet, loaded, ...)")
    parser.add_argument("extra", nargs="*", help="more `surgeon-export run` options (after --)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="main-job-") as tmp:
        command = [sys.executable, "-m", "surgeon_export", "run", "--out", f"{tmp}/surgeon-out", "--json", *args.extra]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        return done.returncode
    result = json.loads(done.stdout)
    seconds = round(wall)
    record = {
        "command": "surgeon-export run " + " ".join(args.extra),
        "wall_clock_seconds": round(wall, 1),
        "wall_clock": f"{seconds // 60} min {seconds % 60} s",
        "peak_rss_mib_children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "note": args.note,
        "environment": {**environment(), "cpu_count": os.cpu_count()},
        "stage_seconds": result["stage_seconds"],
        "row_seconds": {m["label"]: m["wall_seconds"] for m in result["benchmark"]["models"]},
        "prune": result["prune"],
        "onnx_parity_max_abs_logit_diff": result["onnx_parity_max_abs_logit_diff"],
        "runtimes_skipped": result["runtimes_skipped"],
        "benchmark": result["benchmark"],
    }
    stages = "\n".join(f"| {k} | {v:.0f} |" for k, v in result["stage_seconds"].items())
    md = (f"# Main job: `{record['command'].strip()}`\n\nWall clock **{record['wall_clock']}** "
          f"({args.note or 'machine state not noted'}; {os.cpu_count()} cores); the stages:\n\n"
          f"| stage | seconds |\n| --- | ---: |\n{stages}\n\n" + markdown(result["benchmark"]))
    write_file(args.out, json.dumps(record, indent=2))
    write_file(args.out.with_suffix(".md"), md)
    print(f"main job: {record['wall_clock']}; stages {result['stage_seconds']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
