"""The pruning sweep's cell grammar and the summary's per-method tables."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import prune_report
from benchmarks.prune_sweep import PRESETS, cell_args


def test_cell_grammar_maps_to_cli_options() -> None:
    assert cell_args("sparsegpt:0.5") == ["--method", "sparsegpt", "--sparsity", "0.5"]
    assert cell_args("surgeon:2:4") == ["--method", "surgeon", "--pattern", "2:4"]
    assert cell_args("wanda:2:4+sds") == ["--method", "wanda", "--pattern", "2:4", "--refine", "sds"]
    assert cell_args("surgeon:s0.8@uniform") == ["--method", "surgeon", "--structured", "0.8", "--allocation", "uniform"]
    assert all(c.endswith("@uniform") for c in PRESETS["structured"])
    assert len(set(PRESETS["protocol"])) == len(PRESETS["protocol"])


def _cell(ppl: float, sparsity: float, config: dict) -> dict:
    return {"perplexity": ppl, "sparsity": sparsity, "prune_seconds": 1.0, "peak_rss_mib": 1.0, "config": config,
            "command": []}


def test_summary_pivots_best_per_method_and_bolds_the_best(tmp_path: Path) -> None:
    surgeon = {"structured": 0.8, "scoring": "surgeon", "allocation": "uniform", "shots": 3, "group_cost": "output"}
    wanda = {**surgeon, "scoring": "wanda"}
    cells = {
        "surgeon:s0.8": _cell(45.0, 0.2, surgeon),
        "surgeon:s0.8#2": _cell(47.0, 0.2, surgeon),  # a worse run of the same method: not the best
        "wanda:s0.8": _cell(50.0, 0.2, wanda),
        "wanda:s0.7": _cell(60.0, 0.3, {**wanda, "structured": 0.7}),
        "sparsegpt:2:4": _cell(78.5, 0.5, {"method": "sparsegpt", "pattern": "2:4"}),
    }
    (tmp_path / "sweep.json").write_text(json.dumps({"environment": {}, "cells": cells}))
    assert prune_report.main(["--runs", str(tmp_path)]) == 0
    text = (tmp_path / "SUMMARY.md").read_text()
    assert "| 80% kept | **45.00** | 50.00 | wanda channels 51.34; LLM Surgeon (official code) 399.3 |" in text
    assert "| 70% kept |  | **60.00** |" in text
    pivot = text[text.index("### Structured"):]
    assert pivot.index("| 80% kept |") < pivot.index("| 70% kept |")  # most kept first
    assert "| 2:4 | **78.50** | sparsegpt 82.74; wanda 180.45; magnitude 1625.4; LLM Surgeon (official code) 86.48 |" in text
    assert (tmp_path / "ppl_vs_size.png").read_bytes()[:4] == b"\x89PNG"
