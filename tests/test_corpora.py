"""The WikiText-2 corpora ship inside the package: checksummed, and enough for eval anywhere."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from base import data
from base.errors import SurgeonError
from tests.cli_runner import run_cli_process

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("base", "surgeon", "export", "runtime", "benchmarks", "surgeon_export")


def test_packaged_corpora_are_the_protocol_texts() -> None:
    test, origin = data.packaged_corpus(data.EVAL_FILE)
    assert len(test.encode()) == 1_287_656 and "packaged copy, sha256 bbf94c53a05a" in origin
    assert test.startswith(" = Robert Boulter = \n")
    valid, _ = data.packaged_corpus(data.CALIB_FILE)
    assert len(valid.encode()) == 1_121_681 and "<unk>" in valid


def test_a_changed_packaged_corpus_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = gzip.decompress((data.CORPORA / "wiki.test.raw.gz").read_bytes())
    (tmp_path / "wiki.test.raw.gz").write_bytes(gzip.compress(text.replace(b"Boulter", b"Boulder", 1)))
    (tmp_path / "valid.txt.gz").write_bytes(b"not gzip at all")
    monkeypatch.setattr(data, "CORPORA", tmp_path)
    with pytest.raises(SurgeonError, match=r"wiki.test.raw.gz is corrupt \(sha256 .*\); reinstall"):
        data.packaged_corpus(data.EVAL_FILE)
    with pytest.raises(SurgeonError, match=r"valid.txt.gz is unreadable"):
        data.packaged_corpus(data.CALIB_FILE)


def test_data_dir_still_overrides_the_packaged_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / data.EVAL_FILE).write_text("just this\n")
    assert data.corpus(data.EVAL_FILE, tmp_path) == ("just this\n", str(tmp_path / data.EVAL_FILE))
    assert data.corpus(data.CALIB_FILE, tmp_path) is None  # the named directory lacks it
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path))
    assert data.corpus(data.EVAL_FILE, None)[1] == str(tmp_path / data.EVAL_FILE)


def test_eval_runs_from_a_copy_with_no_shared_folder(tmp_path: Path, tiny_llama_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """In new interpreters on purpose: the copy's packages, not this checkout's, are the ones imported."""
    root = tmp_path / "elsewhere"
    for package in PACKAGES:
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__", "results"))
    assert not any((p / "shared").exists() for p in root.parents)
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    env = {"PYTHONPATH": str(root)}
    where = subprocess.run([sys.executable, "-c", "import base.data; print(base.data.CORPORA)"], cwd=root,
                           env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert where.stdout.strip() == str(root / "base" / "corpora")  # the copy, not this checkout
    out = run_cli_process("eval", str(tiny_llama_dir), "--seq-len", "32", "--windows", "3", "--json", "--quiet",
                          cwd=root, env=env)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["text"].startswith("wikitext-2-raw/wiki.test.raw (packaged copy") and result["windows"] == 3
