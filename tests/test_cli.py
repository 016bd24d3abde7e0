"""The CLI as a user meets it: exit codes, one-line errors, JSON output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.metrics import perplexity
from surgeon.data import tokenize
from surgeon.loading import load_model


def run_cli(*args: str, env_data: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "surgeon.cli", *args], capture_output=True, text=True, timeout=300,
    )


def test_help_lists_subcommands() -> None:
    out = run_cli("--help")
    assert out.returncode == 0
    for command in ("eval", "info"):
        assert command in out.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (("eval", "/no/such/dir"), "error: model path not found: /no/such/dir"),
        (("info", "/no/such/dir"), "error: model path not found: /no/such/dir"),
    ],
)
def test_user_errors_are_one_line_exit_2(args: tuple[str, ...], message: str) -> None:
    out = run_cli(*args)
    assert out.returncode == 2
    assert out.stderr.strip() == message
    assert "Traceback" not in out.stderr


def test_eval_window_too_long_and_bad_text(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = run_cli("eval", str(tiny_llama_dir), "--seq-len", "4096", "--quiet")
    assert out.returncode == 2 and "longer than the model's context" in out.stderr
    assert "Traceback" not in out.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = run_cli("eval", str(tiny_llama_dir), "--text", str(empty), "--seq-len", "32", "--quiet")
    assert out.returncode == 2 and out.stderr.strip() == f"error: text file is empty: {empty}"


def test_eval_json_matches_library(tiny_llama_dir: Path, text_file: Path) -> None:
    out = run_cli(
        "eval", str(tiny_llama_dir), "--text", str(text_file), "--seq-len", "32", "--windows", "5",
        "--json", "--quiet",
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    lm = load_model(tiny_llama_dir)
    expected = perplexity(lm.model, tokenize(lm.tokenizer, text_file.read_text()), seq_len=32,
                          max_windows=5, progress=False)
    assert result["windows"] == 5 and result["seq_len"] == 32
    assert result["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6)
    assert result["environment"]["torch"]
    assert result["parameters"]["decoder_linear"] == sum(
        m.weight.numel() for m in lm.adapter.decoder_linears(lm.model).values()
    )


def test_info_json(tiny_llama_dir: Path) -> None:
    out = run_cli("info", str(tiny_llama_dir), "--json", "--quiet")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert (info["layers"], info["num_attention_heads"], info["num_key_value_heads"]) == (2, 4, 2)
