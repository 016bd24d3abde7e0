"""The disk a long streamed run takes, sampled: every ``--every`` seconds, the bytes under ``ROOT`` (all of
it, and each ``surgeon/`` spill directory's, by rank) and the free space of its file system, one JSON line
each to ``--log``. ``summary`` folds a log into a ``disk`` entry of a ladder record (its peaks beside the
estimate :func:`surgeon.streamed_surgeon.spill_bytes` gives for that run)::

    nice -n 19 python -m benchmarks.disk_watch watch /tmp/ladder --log /tmp/disk.jsonl &
    python -m benchmarks.disk_watch summary /tmp/disk.jsonl benchmarks/results/RECORD.json --estimate-gib 35.1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path


def sample(root: Path) -> dict:
    spill: dict[str, int] = {}
    total = 0
    for directory, _, files in os.walk(root):
        for name in files:
            try:
                size = os.path.getsize(os.path.join(directory, name))
            except OSError:  # removed while walked
                continue
            total += size
            if "/surgeon" in directory:
                key = directory.split("/surgeon")[1].strip("/") or "root"
                spill[key] = spill.get(key, 0) + size
    return {"t": time.time(), "spill_by_dir": spill, "ladder_bytes": total, "free": shutil.disk_usage(root).free}


def summary(log: Path) -> dict:
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    spill = [sum(r["spill_by_dir"].values()) for r in rows]
    top = max(range(len(rows)), key=spill.__getitem__)
    return {"samples": len(rows), "seconds_between": round((rows[-1]["t"] - rows[0]["t"]) / max(1, len(rows) - 1), 1),
            "peak_spill_bytes": spill[top], "peak_spill_by_dir": rows[top]["spill_by_dir"],
            "peak_bytes_under_root": max(r["ladder_bytes"] for r in rows), "least_free_bytes": min(r["free"] for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("watch")
    w.add_argument("root", type=Path)
    w.add_argument("--log", type=Path, required=True)
    w.add_argument("--every", type=float, default=30.0)
    s = sub.add_parser("summary")
    s.add_argument("log", type=Path)
    s.add_argument("record", type=Path)
    s.add_argument("--estimate-gib", type=float, required=True)
    args = parser.parse_args()
    if args.cmd == "watch":
        with args.log.open("a") as out:
            while True:
                out.write(json.dumps(sample(args.root)) + "\n")
                out.flush()
                time.sleep(args.every)
    record = json.loads(args.record.read_text())
    record["disk"] = {**summary(args.log), "estimate_bytes": round(args.estimate_gib * 2**30),
                      "note": "sampled by benchmarks/disk_watch.py; estimate: surgeon.streamed_surgeon.spill_bytes "
                              "(without the checkpoint)"}
    args.record.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
