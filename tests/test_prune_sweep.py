"""The pruning sweep's cell grammar and the summary's per-method tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import prune_report
from benchmarks.prune_sweep import (
    PRESETS,
    bench_skip,
    bench_summary,
    cell_args,
    cell_kind,
    cell_target,
    parse_bench,
)


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


def test_bench_backends_apply_per_kind_of_cell() -> None:
    assert [cell_kind(c) for c in ("wanda:0.5+sds", "surgeon:2:4@global", "surgeon:s0.8@uniform")] == \
        ["unstructured", "N:M", "structured"]
    assert cell_target("wanda:4:8+sds@global") == "4:8" and cell_target("surgeon:s0.8@uniform") == "s0.8"
    assert bench_skip("torch-24", "N:M") is None and bench_skip("torch-csr", "N:M") is None
    assert "N:M" in bench_skip("torch-24", "unstructured") and "N:M" in bench_skip("torch-24-sparse", "structured")
    assert bench_skip("torch-csr", "structured") and bench_skip("onnxruntime", "structured") is None
    assert parse_bench("torch, onnxruntime,torch") == ["torch", "onnxruntime"]
    with pytest.raises(SystemExit, match="torch-24"):
        parse_bench("torch,tensorrt")


def _bench_model(label: str, backend: str, size: float, prefill: float, decode: float) -> dict:
    return {"label": label, "backend": backend, "baseline": label == "dense",
            "ratios": {"bytes_on_disk": size, "prefill": {"1x128": {"latency": prefill}, "8x512": None},
                       "decode": {"b1": {"throughput": decode}}}}


def test_bench_summary_gives_ratios_to_dense_and_to_the_same_backend(tmp_path: Path) -> None:
    doc = {"environment": {"device": "cpu"}, "models": [
        _bench_model("dense", "torch", 1.0, 1.0, 1.0),
        _bench_model("pruned", "torch", 0.8, 0.75, 1.2),
        _bench_model("dense-ort", "onnxruntime", 1.0, 0.8, 1.25),
        _bench_model("pruned-ort", "onnxruntime", 0.8, 0.6, 1.5),
    ]}
    summary = bench_summary(doc)
    assert set(summary) == {"pruned", "pruned-ort"}
    assert summary["pruned"]["vs_dense"] == {"prefill_latency": {"1x128": 0.75, "8x512": None},
                                             "decode_throughput": {"b1": 1.2}}
    assert "vs_same_backend" not in summary["pruned"]
    same = summary["pruned-ort"]["vs_same_backend"]
    assert same["prefill_latency"]["1x128"] == pytest.approx(0.75) and same["prefill_latency"]["8x512"] is None
    assert same["decode_throughput"]["b1"] == pytest.approx(1.2)
    cell = _cell(78.5, 0.5, {"method": "sparsegpt", "pattern": "2:4"})
    cell["bench"] = {"artefacts": summary, "skipped": {"torch-24": "no pattern"}, "errors": {"torch-csr": "boom"},
                     "device": "cpu", "file": "sweep.bench/sparsegpt_2_4.json"}
    lines = prune_report.bench_table({"sparsegpt:2:4": cell})
    text = "\n".join(lines)
    assert "| sparsegpt:2:4 | 78.50 | onnxruntime | 0.800 [0.800] | 0.600 [0.750] |  | 1.500 [1.200] | cpu |" in text
    assert "| torch-24 | skipped: no pattern |" in text and "| torch-csr | failed: boom |" in text
    (tmp_path / "sweep.json").write_text(json.dumps({"environment": {}, "cells": {"sparsegpt:2:4": cell}}))
    assert prune_report.main(["--runs", str(tmp_path)]) == 0
    assert "### Size and speed per backend" in (tmp_path / "SUMMARY.md").read_text()


def test_sweep_benchmarks_each_cell_on_every_backend_that_applies(tiny_llama_dir: Path, text_file: Path,
                                                                   tmp_path: Path) -> None:
    """End to end on a tiny model: prune, save, pack, benchmark against the dense model, summarise."""
    from benchmarks import prune_sweep

    out = tmp_path / "runs" / "sweep.json"
    grid = "--prefill 1x16 --decode 1 --new-tokens 4 --prompt-len 8 --repeat 5 --warmup 1"
    code = prune_sweep.main([
        "--model", str(tiny_llama_dir), "--cells", "wanda:2:4,magnitude:s0.5", "--threads", "1", "--out", str(out),
        "--bench", "torch,torch-24,torch-24-sparse,torch-csr", "--bench-args", grid, "--",
        "--calib-text", str(text_file), "--calib-samples", "4", "--seq-len", "16", "--no-eval", "--shots", "1",
    ])
    assert code == 0
    cells = json.loads(out.read_text())["cells"]
    nm, structured = cells["wanda:2:4"], cells["magnitude:s0.5"]
    assert "error" not in nm and nm["perplexity"] is None and nm["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert "artefacts" in nm["bench"], nm["bench"]
    arts = nm["bench"]["artefacts"]
    assert {a["backend"] for a in arts.values()} == {"torch", "torch-24", "torch-24-sparse", "torch-csr"}
    assert not nm["bench"]["errors"]
    for a in arts.values():
        assert a["bytes_on_disk"] > 0 and a["vs_dense"]["prefill_latency"]["1x16"] > 0
        assert a["vs_dense"]["decode_throughput"]["b1"] > 0
    assert arts["pruned"]["bytes_on_disk"] == pytest.approx(1.0, abs=0.05)  # zeros stored densely
    assert arts["pruned-24"]["bytes_on_disk"] < arts["pruned"]["bytes_on_disk"]  # the 2:4 pack stores half
    assert arts["pruned-24-sparse"]["bytes_on_disk"] == arts["pruned-24"]["bytes_on_disk"]  # the same pack
    assert set(structured["bench"]["skipped"]) == {"torch-24", "torch-24-sparse", "torch-csr"}
    assert structured["bench"]["artefacts"]["pruned"]["bytes_on_disk"] < 0.9  # physically smaller
    assert (out.parent / "sweep.bench" / "wanda_2_4.json").is_file()
    assert "### Size and speed per backend" in out.with_suffix(".md").read_text()
