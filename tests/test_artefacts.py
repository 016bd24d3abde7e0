"""The artefact layer (base/files.py, base/resume.py, base.loading.check_shapes): one atomic writer for a
file and one for a directory, one temporary name that the next run's cleaner knows for every writer
family, one resume state for every resumable stage, one check of stored shapes against the config."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import torch

from base.errors import SurgeonError
from base.files import WriteError, clean_stale, install_dir, write_dir, write_file
from base.resume import ResumeState
from surgeon_export import api
from tests.conftest import (
    dead_pid,
    killed_writers_temporary,
    make_tiny_llama,
    make_tokenizer,
    tensors,
    tiny_llama_config,
)


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --- one temporary name, cleaned by the next run's writer of the same target, for every writer family ---------------


def test_a_file_writer_removes_what_a_killed_writer_of_its_target_left(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """write_file: benchmark results, model cards and reports, surgeon_report.json."""
    import benchmarks.report
    from export.card import add_measurements

    monkeypatch.setattr(benchmarks.report, "markdown", lambda result: "| table |\n")
    monkeypatch.setattr(benchmarks.report, "plot_quality", lambda result: None)
    monkeypatch.setattr(benchmarks.report, "plot_speedup", lambda result: None)

    result = tmp_path / "bench.json"
    killed = [killed_writers_temporary(result), killed_writers_temporary(tmp_path / "bench.md")]
    other = killed_writers_temporary(tmp_path / "other.json")  # another target's: not this writer's to clean
    benchmarks.report.write_outputs({"models": []}, result)
    assert not any(p.exists() for p in killed) and other.exists()
    assert json.loads(result.read_text())["outputs"]["markdown"] == "bench.md"

    checkpoint = tmp_path / "ckpt"
    write_file(checkpoint / "surgeon_report.json", json.dumps({"model": "m"}))
    killed = killed_writers_temporary(checkpoint / "surgeon_report.json")
    add_measurements(checkpoint, ["perplexity 12.00"])
    assert not killed.exists() and names(checkpoint) == ["surgeon_report.json"]
    assert json.loads((checkpoint / "surgeon_report.json").read_text())["measured"] == ["perplexity 12.00"]


def test_a_directory_writer_removes_what_a_killed_writer_of_its_target_left(tmp_path: Path) -> None:
    """write_dir: checkpoints, packs, ONNX exports (export.checkpoint.write_atomically), the model cache."""
    from export.checkpoint import write_atomically

    out = tmp_path / "out"
    killed = killed_writers_temporary(out, directory=True)
    write_atomically(out, False, lambda tmp: (tmp / "config.json").write_text("{}"))
    assert names(tmp_path) == ["out"] and names(out) == ["config.json"]

    cache = tmp_path / "cache-entry"  # the model cache keeps a copy another process finished first
    killed = killed_writers_temporary(cache, directory=True)
    write_dir(cache, lambda tmp: (tmp / "a").write_text("first"), replace=False)
    write_dir(cache, lambda tmp: (tmp / "a").write_text("second"), replace=False)
    assert not killed.exists() and (cache / "a").read_text() == "first"


def test_the_gguf_writer_removes_what_a_killed_writer_of_its_file_or_card_left(tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    from export.gguf import card_path, export_gguf

    tokenizer = make_tokenizer(vocab_size=320)  # with BPE merges, as llama.cpp needs
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer)))
    model.save_pretrained(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "src")
    out = tmp_path / "out" / "m.gguf"
    killed = [killed_writers_temporary(out), killed_writers_temporary(card_path(out))]
    export_gguf(tmp_path / "src", out, tensor_type="f32")
    assert names(out.parent) == ["m.gguf", "m.md"] and not any(p.exists() for p in killed)


def test_resumable_stages_remove_what_a_killed_writer_of_a_piece_left(tmp_path: Path, text_file: Path) -> None:
    """Every resumable stage opens its directory through ResumeState: LLM Surgeon's --checkpoint here (the
    streamed checkpoint's shards: tests/test_streaming.py)."""
    model, tokenizer = make_tiny_llama()
    model.save_pretrained(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "src")
    ckpt = tmp_path / "ckpt"
    killed = [killed_writers_temporary(ckpt / "state-1.safetensors"), killed_writers_temporary(ckpt / "progress.json")]
    (ckpt / "notes.txt").write_text("the user's own file")  # not a piece: kept
    api.prune(api.load(tmp_path / "src"), api.build_config("surgeon", sparsity=0.5, shots=1), calib_samples=4,
              seq_len=16, calib_text=text_file, checkpoint=ckpt)
    assert names(ckpt) == ["notes.txt", "progress.json", "state-1.safetensors"]
    assert not any(p.exists() for p in killed)


def test_a_kill_between_the_two_renames_of_a_replacement_is_undone_by_the_next_cleaner(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "f").write_text("old")
    aside = tmp_path / f".out.old-{dead_pid()}-abcd1234"  # moved aside, then killed before the new one came in
    os.replace(out, aside)
    then = time.time() - 3600
    os.utime(aside, (then, then))
    assert clean_stale(tmp_path, "out") == [aside] and (out / "f").read_text() == "old"  # put back

    again = tmp_path / f".out.old-{dead_pid()}-efgh5678"  # the new one came in: the old copy goes
    again.mkdir()
    os.utime(again, (then, then))
    assert clean_stale(tmp_path, "out") == [again] and names(tmp_path) == ["out"]


def test_writers_replace_atomically_with_the_usual_permissions(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "f").write_text("")
    write_file(tmp_path / "a.txt", "text")
    write_dir(tmp_path / "d", lambda tmp: None)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == (plain / "f").stat().st_mode & 0o777  # not mkstemp's 0600
    assert (tmp_path / "d").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # not mkdtemp's 0700

    write_dir(tmp_path / "d", lambda tmp: (tmp / "new").write_text("new"))  # replaces the old directory whole
    assert names(tmp_path / "d") == ["new"]

    def half_then_full(path: Path) -> None:
        (path / "half" if path.is_dir() else path).write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(WriteError, match=r"^cannot write .*/d: no space left on device; nothing was written$"):
        write_dir(tmp_path / "d", half_then_full)
    with pytest.raises(WriteError, match=r"^cannot write .*/a.txt: no space left on device; nothing was written$"):
        write_file(tmp_path / "a.txt", half_then_full)
    assert names(tmp_path) == ["a.txt", "d", "plain"]  # no temporary left; the old outputs as they were
    assert (tmp_path / "a.txt").read_text() == "text" and names(tmp_path / "d") == ["new"]


def test_install_dir_puts_the_old_directory_back_when_the_rename_fails(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    out, built = tmp_path / "out", tmp_path / "built"
    out.mkdir()
    (out / "f").write_text("old")
    built.mkdir()
    real = os.replace

    def refuse_the_second(src: object, dst: object) -> None:
        if Path(src) == built:
            raise OSError(30, "Read-only file system")
        real(src, dst)

    monkeypatch.setattr(os, "replace", refuse_the_second)
    with pytest.raises(OSError):
        install_dir(built, out)
    assert (out / "f").read_text() == "old" and names(tmp_path) == ["built", "out"]


# --- one resume state ---------------------------------------------------------------------------------------------


def saved_state(directory: Path, binding: dict) -> ResumeState:
    state = ResumeState.open(directory, "progress.json", 1, binding, pieces="part-*")
    assert not state.resumed
    state.put_tensors("part-1.safetensors", {"w": torch.arange(6.0).reshape(2, 3)})
    state.put_json("part-1.json", {"done": 1})
    state.save(step=1)
    return state


def test_resume_state_resumes_its_own_run(tmp_path: Path) -> None:
    binding = {"source model": "abc", "config": {"sparsity": 0.5, "shots": (1, 2)}, "seed": 0}
    saved_state(tmp_path, binding)
    (tmp_path / "part-2.safetensors").write_bytes(b"written, then killed before the state named it")
    state = ResumeState.open(tmp_path, "progress.json", 1, binding, pieces="part-*")
    assert state.resumed and state.data == {"step": 1} and names(tmp_path) == ["part-1.json", "part-1.safetensors",
                                                                                "progress.json"]
    assert torch.equal(state.tensors("part-1.safetensors")["w"], torch.arange(6.0).reshape(2, 3))
    assert state.load_json("part-1.json") == {"done": 1}

    state.forget("part-1.*")  # the next piece replaces them: their files go once the state stops naming them
    state.put_json("part-2.json", {"done": 2})
    assert names(tmp_path) == ["part-1.json", "part-1.safetensors", "part-2.json", "progress.json"]
    state.save(step=2)
    assert names(tmp_path) == ["part-2.json", "progress.json"]
    assert json.loads((tmp_path / "progress.json").read_text())["pieces"].keys() == {"part-2.json"}


@pytest.mark.parametrize("change, message", [
    (lambda d: None, None),
    (lambda d: "other binding", r"it was made with other settings \(config.sparsity, seed\); rerun with the same "
                                r"model and options, or remove it to start over$"),
    (lambda d: "other model", r"it was made with another model and other settings \(seed\);"),
    (lambda d: (d / "part-1.safetensors").write_bytes((d / "part-1.safetensors").read_bytes()[:-1] + b"\x01"),
     r"part-1.safetensors does not match its checksum in progress.json \(the file was changed or damaged\); "
     r"remove it to start over$"),
    (lambda d: (d / "part-1.json").unlink(), r"part-1.json, listed in progress.json, is missing"),
    (lambda d: (d / "progress.json").write_text("{half"), r"progress.json is unreadable \("),
    (lambda d: (d / "progress.json").write_text(json.dumps({**json.loads((d / "progress.json").read_text()),
                                                            "version": 0})),
     r"progress.json was written by another surgeon-export version; remove it to start over$"),
    (lambda d: (d / "progress.json").write_text(json.dumps({**json.loads((d / "progress.json").read_text()),
                                                            "pieces": {"../elsewhere": "0"}})),
     "written by another surgeon-export version"),
], ids=["same run", "settings", "model", "changed piece", "missing piece", "unreadable", "version", "foreign piece"])
def test_resume_state_refuses_another_run_or_damaged_pieces_in_one_line(tmp_path: Path, change, message) -> None:
    binding = {"source model": "abc", "config": {"sparsity": 0.5}, "seed": 0}
    saved_state(tmp_path, binding)
    what = change(tmp_path)
    if what == "other binding":
        binding = {**binding, "config": {"sparsity": 0.6}, "seed": 1}
    elif what == "other model":
        binding = {**binding, "source model": "xyz", "seed": 1}
    if message is None:
        assert ResumeState.open(tmp_path, "progress.json", 1, binding, pieces="part-*").resumed
        return
    with pytest.raises(SurgeonError) as err:
        ResumeState.open(tmp_path, "progress.json", 1, binding, pieces="part-*")
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"cannot resume from {tmp_path}: "), line
    assert re.search(message, line), line


def test_a_write_error_of_a_piece_is_one_line_naming_the_target(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import base.resume

    def full(tensors: dict, path: str) -> None:
        Path(path).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    state = ResumeState.open(tmp_path / "partial", "progress.json", 1, {}, target=tmp_path / "out")
    monkeypatch.setattr(base.resume, "save_file", full)
    with pytest.raises(WriteError, match=r"^cannot write .*/out: no space left on device; nothing was written$"):
        state.put_tensors("piece.safetensors", {"w": torch.zeros(2)})
    assert not (tmp_path / "partial").exists() or names(tmp_path / "partial") == []


# --- one check of stored shapes against the config, one tied rule -------------------------------------------------


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_stored_shapes_against_the_config(tmp_path: Path, tied: bool) -> None:
    from base.lazy import open_lazy
    from base.loading import check_shapes, load_model, tied_keys

    model, tokenizer = make_tiny_llama(tie_word_embeddings=tied)
    assert tied_keys(model) == ({"lm_head.weight"} if tied else set())
    stored = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_shapes(tmp_path, model, stored)  # everything, the tied head included
    without_head = {k: s for k, s in stored.items() if k != "lm_head.weight"}
    if tied:
        check_shapes(tmp_path, model, without_head)  # a tied head need not be stored
    else:
        shape = re.escape(str(list(stored["lm_head.weight"])))
        with pytest.raises(SurgeonError, match=rf"tensor lm_head.weight {shape} is missing from the checkpoint$"):
            check_shapes(tmp_path, model, without_head)
    with pytest.raises(SurgeonError, match=r"tensor model.norm.weight has shape \[31\], but config.json says \[32\]$"):
        check_shapes(tmp_path, model, {**stored, "model.norm.weight": (31,)})
    with pytest.raises(SurgeonError, match=r"tensor model.layers.2.mlp.up_proj.weight is not part of the model "
                                           r"config.json describes \(1 unexpected tensors\)$"):
        check_shapes(tmp_path, model, {**stored, "model.layers.2.mlp.up_proj.weight": (64, 32)})

    model.save_pretrained(tmp_path / "m")  # what the loaders read: the head is stored only when untied
    tokenizer.save_pretrained(tmp_path / "m")
    assert ("lm_head.weight" in tensors(tmp_path / "m")) is not tied
    whole, lazy = load_model(tmp_path / "m"), open_lazy(tmp_path / "m")
    assert torch.equal(whole.model.lm_head.weight, lazy.model.lm_head.weight)
    assert (whole.model.lm_head.weight.data_ptr() == whole.model.model.embed_tokens.weight.data_ptr()) is tied
