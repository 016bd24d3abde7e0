"""The pruning-run summary reads both payload kinds and writes a table and a plot."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.prune_report import collect, main


def test_summary_reads_cli_payloads_and_sweeps(tmp_path: Path) -> None:
    single = {"config": {"method": "sparsegpt", "sparsity": None, "pattern": "2:4", "refine": {"l1": 0.1}},
              "sparsity": 0.5, "seconds": 12.0, "perplexity": {"perplexity": 70.0}, "peak_rss_mib": 100.0}
    sweep = {"cells": {
        "surgeon:s0.9": {"config": {"structured": 0.9, "scoring": "surgeon", "shots": 3, "allocation": "uniform",
                                    "group_cost": "output"}, "sparsity": 0.1, "perplexity": 36.0,
                         "prune_seconds": 5.0, "peak_rss_mib": 1.0, "command": ["--calib-samples", "32"]},
        "wanda:0.5": {"error": "failed"},
    }, "environment": {"git_commit": "abc"}}
    (tmp_path / "a.json").write_text(json.dumps(single))
    (tmp_path / "b.json").write_text(json.dumps(sweep))
    rows = collect(tmp_path)
    assert [(r["method"], r["target"], r["kind"]) for r in rows] == [
        ("sparsegpt + SDS", "2:4", "N:M"), ("LLM Surgeon", "90% kept", "structured")]
    assert rows[1]["calibration_windows"] == 32 and rows[1]["settings"] == "3 shots, group cost output, uniform"
    assert main(["--runs", str(tmp_path)]) == 0
    text = (tmp_path / "SUMMARY.md").read_text()
    assert "| 2:4 | sparsegpt + SDS |  | 70.00 |" in text
    assert (tmp_path / "ppl_vs_size.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["--runs", str(tmp_path / "missing")]) == 2
