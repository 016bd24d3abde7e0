"""The layer contract (.importlinter) holds, and it fails on an upward import or a circle."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("base", "surgeon", "export", "runtime", "benchmarks", "surgeon_export")


def lint(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the packages under ``root`` (imported from there, not from the install)."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    command = "from importlinter.cli import lint_imports_command; lint_imports_command()"  # the lint-imports script
    return subprocess.run([sys.executable, "-c", command, "--config", str(root / ".importlinter"), "--no-cache"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_the_repository_keeps_the_contract() -> None:
    out = lint(REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Contracts: 3 kept, 0 broken." in out.stdout


@pytest.mark.parametrize("module, line, broken", [
    ("base/errors.py", "import benchmarks.run  # upward: the base layer reaching the top", "Layers, from the CLI"),
    ("runtime/generate.py", "import surgeon_export.cli  # upward: a runtime reaching the CLI", "Layers, from the CLI"),
    ("benchmarks/gate.py", "import benchmarks.run  # a circle: run imports gate", "No import cycles"),
    ("surgeon_export/cli.py", "import base.errors  # past the API", "The CLI imports nothing of ours but the API"),
])
def test_the_contract_fails_on_a_violation(tmp_path: Path, module: str, line: str, broken: str) -> None:
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "results"))
    shutil.copy(REPO / ".importlinter", tmp_path)
    with (tmp_path / module).open("a") as f:
        f.write(f"\n{line}\n")
    out = lint(tmp_path)
    assert out.returncode != 0
    assert f"{broken}" in out.stdout and "BROKEN" in out.stdout
    assert "Contracts: 2 kept, 1 broken." in out.stdout
