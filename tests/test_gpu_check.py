"""The prepared GPU script, run on CPU with a tiny model: the steps it can take without a GPU work,
so that a session lent a GPU spends its minutes on measuring, not on fixing the script."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import gpu_check


def test_prepare_then_run_the_end_to_end_step_on_cpu(tiny_llama_dir: Path, tmp_path: Path) -> None:
    spec, out = tmp_path / "spec", tmp_path / "out"
    assert gpu_check.main(["prepare", str(spec), "--model", str(tiny_llama_dir)]) == 0
    assert (spec / "config.json").is_file() and not list(spec.glob("*.safetensors"))  # no weights travel
    assert gpu_check.main(["run", str(spec), "--out", str(out), "--device", "cpu", "--quick", "--steps", "e2e"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["e2e"]["ok"] and "tests" not in summary
    result = json.loads((out / "e2e.json").read_text())
    assert [m["backend"] for m in result["models"]] == ["torch", "torch-24", "torch-24-sparse"]
    dense, packed, _ = result["models"]
    assert dense["artefact"]["sparsity"] == pytest.approx(0.5) and packed["artefact"]["format"] == "2:4"
    assert packed["ratios"]["bytes_on_disk"] < 0.8 and packed["prefill"][0]["status"] == "ok"
    assert sorted(p.name for p in out.iterdir()) == ["e2e.json", "e2e.md", "summary.json"]  # plots dropped


def test_a_failing_step_is_recorded_and_the_exit_code_says_so(tiny_llama_dir: Path, tmp_path: Path) -> None:
    spec, out = tmp_path / "spec", tmp_path / "out"
    gpu_check.prepare(str(tiny_llama_dir), spec)
    (spec / "config.json").write_text("{}")  # no model_type: the model cannot be built
    assert gpu_check.main(["run", str(spec), "--out", str(out), "--device", "cpu", "--quick", "--steps", "e2e"]) == 1
    step = json.loads((out / "summary.json").read_text())["e2e"]
    assert not step["ok"] and step["error"]


def test_run_refuses_a_directory_prepare_did_not_write(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["run", str(tmp_path), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
