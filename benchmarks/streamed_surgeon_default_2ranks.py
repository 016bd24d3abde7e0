"""Streamed LLM Surgeon structured (the default: 80% kept, global allocation, 3 shots, 16 x 512) on the default
model: one process x 1 thread against torchrun 2 ranks x 1 thread; tensors, removed groups, perplexity.

    python -m benchmarks.streamed_surgeon_default_2ranks [WORK]

Writes ``benchmarks/results/streamed_surgeon_default_2ranks.json``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from base.env import environment
from base.files import write_file
from benchmarks.streaming import perplexity, run_prune, same_tensors

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--method", "surgeon", "--structured", "0.8", "--streaming", "--no-eval"]


def shrunk(out: Path, to: Path) -> float:
    """The protocol perplexity of ``out`` with its zeroed groups cut out."""
    subprocess.run([sys.executable, "-m", "surgeon_export", "shrink", str(out), "--out", str(to), "--force", "--quiet"],
                   check=True, cwd=ROOT)
    return perplexity(to, 2)


def main() -> None:
    work = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/default2")
    work.mkdir(exist_ok=True)
    runs = {}
    for name, ranks in (("1 process", 1), ("2 ranks", 2)):
        out = work / name.replace(" ", "-")
        r = run_prune(None, out, ARGS, 1, ranks=ranks)  # each process / rank 1 thread
        if r.get("error"):
            sys.exit(f"{name}: {r['error']}")
        launch = "torchrun --standalone --nproc-per-node 2 -m surgeon_export" if ranks > 1 else "surgeon-export"
        runs[name] = {"command": " ".join([launch, "prune", *ARGS, "--threads", "1", "--out", str(out)]),
                      "wall_seconds": round(r["wall_seconds"], 1), "prune_seconds": r.get("seconds"),
                      "peak_rss_mib": r.get("peak_rss_mib"), "distributed": r.get("distributed"),
                      "removal": r.get("removal"), "shot_sparsities": [s["sparsity"] for s in r.get("shots", [])],
                      "out": str(out)}
        print(name, runs[name]["wall_seconds"], flush=True)
    a, b = runs["1 process"], runs["2 ranks"]
    doc = {"kind": "streamed LLM Surgeon, one process against torchrun (default model)",
           "environment": {**environment(), "threads": 1},
           "note": "SmolLM2-135M-Instruct, LLM Surgeon structured 80% kept, global allocation, 3 shots, 16 x 512 WikiText-2 "
                   "calibration (the defaults), streamed; each process / rank 1 thread; machine otherwise quiet",
           "runs": {k: {kk: vv for kk, vv in v.items() if kk != "removal"} for k, v in runs.items()},
           "identical_tensors": same_tensors(Path(a["out"]), Path(b["out"])),
           "same_removed_groups": a["removal"] == b["removal"], "same_shot_sparsities": a["shot_sparsities"] == b["shot_sparsities"]}
    doc["perplexity"] = {"1 process (shrunk)": shrunk(Path(a["out"]), work / "shrunk")}
    if not doc["identical_tensors"]:
        doc["perplexity"]["2 ranks (shrunk)"] = shrunk(Path(b["out"]), work / "shrunk2")
    write_file(ROOT / "benchmarks/results/streamed_surgeon_default_2ranks.json", json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: v for k, v in doc.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
