"""The regression gate: hand-built stored results, the comparison rules, and the CLI's exit codes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from base.errors import SurgeonError
from benchmarks.gate import compare, gate_table, load_baseline, parse_tolerance
from tests.cli_runner import run_cli
from tests.conftest import CORPUS, make_tiny_llama


def doc(latency: float, throughput: float, ppl: float, cell: str = "1x8", decode: str = "b1") -> dict:
    """A minimal stored result by hand: baseline 'dense' and one 'pruned' model."""
    def model(label: str, lat: float, thr: float, p: float) -> dict:
        return {"label": label, "perplexity": {"perplexity": p, "windows": 2, "seq_len": 32},
                "ratios": {"prefill": {cell: {"latency": lat}}, "decode": {decode: {"throughput": thr}}}}
    return {"schema_version": 1, "models": [model("dense", 1.0, 1.0, 20.0), model("pruned", latency, throughput, ppl)]}


def test_parse_tolerance() -> None:
    assert parse_tolerance("5%") == pytest.approx(0.05) and parse_tolerance("0.1") == 0.1
    for bad in ("five", "-1%"):
        with pytest.raises(SurgeonError, match="max-regression"):
            parse_tolerance(bad)


@pytest.mark.parametrize(
    "stored, passed, regressed",
    [
        (doc(0.80, 1.25, 30.0), True, []),  # identical
        (doc(0.90, 1.10, 33.0), True, []),  # stored was worse: an improvement passes
        (doc(0.78, 1.27, 29.0), True, []),  # within 5%
        (doc(0.40, 1.25, 30.0), False, ["prefill 1x8 latency ratio"]),  # stored was 2x faster
        (doc(0.80, 2.50, 30.0), False, ["decode b1 tokens/s ratio"]),
        (doc(0.80, 1.25, 20.0), False, ["perplexity"]),
    ],
)
def test_compare_flags_only_real_regressions(stored: dict, passed: bool, regressed: list[str]) -> None:
    gate = compare(doc(0.80, 1.25, 30.0), stored, 0.05, "old.json")
    assert gate["passed"] is passed
    assert [r["metric"] for r in gate["rows"] if r["status"] == "regressed"] == regressed
    assert len(gate["rows"]) == 4  # ppl of both models, plus the pruned model's two speed ratios
    assert ("FAILED" in gate_table(gate)) is not passed


def test_change_is_signed_by_direction() -> None:
    rows = {r["metric"]: r for r in compare(doc(0.9, 1.0, 30.0), doc(0.6, 2.0, 30.0), 0.05)["rows"]}
    assert rows["prefill 1x8 latency ratio"]["change"] == pytest.approx(0.9 / 0.6 - 1)
    assert rows["decode b1 tokens/s ratio"]["change"] == pytest.approx(2.0 / 1.0 - 1)


def test_nothing_in_common_is_an_error() -> None:
    stored = doc(0.8, 1.2, 30.0, cell="4x64", decode="b8")
    for m in stored["models"]:
        m["perplexity"] = None
    with pytest.raises(SurgeonError, match="nothing to compare"):
        compare(doc(0.8, 1.2, 30.0), stored, 0.05)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "baseline file not found"),
        ("{not json", "old.json: not valid JSON"),
        ('{"models": []}', "no schema_version"),
        ('{"schema_version": 99, "models": []}', "schema_version 99"),
        ('{"schema_version": 1, "models": [{"label": "x"}]}', "is malformed"),
    ],
)
def test_malformed_baseline_is_a_user_error(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "old.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SurgeonError, match=message):
        load_baseline(path)


@pytest.fixture(scope="module")
def cli_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gate-models")
    for seed, name in ((0, "dense"), (1, "pruned")):
        model, tokenizer = make_tiny_llama(seed=seed)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    (root / "text.txt").write_text(CORPUS * 40)
    return root


def bench(root: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """``surgeon-export bench`` of the dense and the pruned tiny model, a few cells, results in ``out``."""
    return run_cli("bench", f"dense={root / 'dense'}", f"pruned={root / 'pruned'}", "--prefill", "1x8", "--decode", "1",
                   "--new-tokens", "2", "--prompt-len", "8", "--text", str(root / "text.txt"), "--ppl-seq-len", "32",
                   "--ppl-windows", "2", "--isolation", "inline", "--quiet", "--out", str(out), *extra)


def test_cli_gate_exit_codes(cli_models: Path, tmp_path: Path) -> None:
    done = bench(cli_models, tmp_path / "first.json")
    assert done.returncode == 0, done.stderr
    first = json.loads((tmp_path / "first.json").read_text())
    ppl = first["models"][1]["perplexity"]["perplexity"]

    generous = doc(10.0, 0.01, 10 * ppl)  # the stored run was far worse: passes
    generous["models"][0]["perplexity"]["perplexity"] = 1e9
    for m in generous["models"]:
        m["perplexity"]["windows"] = 2
    (tmp_path / "generous.json").write_text(json.dumps(generous))
    done = bench(cli_models, tmp_path / "ok.json", "--baseline", str(tmp_path / "generous.json"))
    assert done.returncode == 0 and "passed" in done.stdout, done.stderr

    strict = doc(1e-3, 1e3, ppl)  # the stored ratios were 1000x better: fails with a diff table
    (tmp_path / "strict.json").write_text(json.dumps(strict))
    done = bench(cli_models, tmp_path / "bad.json", "--baseline", str(tmp_path / "strict.json"),
                 "--max-regression", "10%")
    out = done.stdout
    assert done.returncode == 1 and "FAILED" in out and "| pruned | prefill 1x8 latency ratio |" in out and "regressed" in out
    assert json.loads((tmp_path / "bad.json").read_text())["gate"]["passed"] is False


def test_cli_malformed_baseline_exits_2_before_measuring(cli_models: Path, tmp_path: Path) -> None:
    bad = tmp_path / "old.json"
    bad.write_text("{truncated")
    out = tmp_path / "res" / "new.json"
    done = bench(cli_models, out, "--baseline", str(bad))
    err = done.stderr.strip()
    assert done.returncode == 2, err
    assert err.startswith(f"error: {bad}: not valid JSON") and "\n" not in err
    assert not out.parent.exists()
