"""Streamed LLM Surgeon structured (the default: 80% kept, global allocation, 3 shots, 16 x 512) on the default
model: one process x 1 thread against torchrun 2 ranks x 1 thread; tensors, removed groups, perplexity.

    python -m benchmarks.streamed_surgeon_default_2ranks [WORK]

Writes ``benchmarks/results/streamed_surgeon_default_2ranks.json``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from base.env import environment
from benchmarks.streaming import perplexity, same_tensors

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    work = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/default2")
    work.mkdir(exist_ok=True)
    args = ["prune", "--method", "surgeon", "--structured", "0.8", "--streaming", "--no-eval", "--json", "--quiet",
            "--threads", "1", "--force"]
    runs = {}
    for name, launch in (("1 process", [sys.executable, "-m", "surgeon_export"]),
                         ("2 ranks", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                                      "-m", "surgeon_export"])):
        out = work / name.replace(" ", "-")
        t = time.perf_counter()
        proc = subprocess.run([*launch, *args, "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            sys.exit(proc.stderr[-3000:])
        r = json.loads(proc.stdout)
        runs[name] = {"command": " ".join(["torchrun --standalone --nproc-per-node 2 -m surgeon_export" if "ranks" in name
                                           else "surgeon-export", *args, "--out", str(out)]),
                      "wall_seconds": round(wall, 1), "prune_seconds": r.get("seconds"), "peak_rss_mib": r.get("peak_rss_mib"),
                      "distributed": r.get("distributed"), "removal": r.get("removal"),
                      "shot_sparsities": [s["sparsity"] for s in r.get("shots", [])], "out": str(out)}
        print(name, runs[name]["wall_seconds"], flush=True)
    a, b = runs["1 process"], runs["2 ranks"]
    doc = {"kind": "streamed LLM Surgeon, one process against torchrun (default model)", "environment": {**environment(), "threads": 1},
           "note": "SmolLM2-135M-Instruct, LLM Surgeon structured 80% kept, global allocation, 3 shots, 16 x 512 WikiText-2 "
                   "calibration (the defaults), streamed; each process / rank 1 thread; machine otherwise quiet",
           "runs": {k: {kk: vv for kk, vv in v.items() if kk != "removal"} for k, v in runs.items()},
           "identical_tensors": same_tensors(Path(a["out"]), Path(b["out"])),
           "same_removed_groups": a["removal"] == b["removal"], "same_shot_sparsities": a["shot_sparsities"] == b["shot_sparsities"]}
    subprocess.run([sys.executable, "-m", "surgeon_export", "shrink", a["out"], "--out", str(work / "shrunk"), "--force", "--quiet"], check=True, cwd=ROOT)
    doc["perplexity"] = {"1 process (shrunk)": perplexity(work / "shrunk", 2)}
    if not doc["identical_tensors"]:
        subprocess.run([sys.executable, "-m", "surgeon_export", "shrink", b["out"], "--out", str(work / "shrunk2"), "--force", "--quiet"], check=True, cwd=ROOT)
        doc["perplexity"]["2 ranks (shrunk)"] = perplexity(work / "shrunk2", 2)
    ROOT / "benchmarks/results/streamed_surgeon_default_2ranks.json".write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: v for k, v in doc.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
