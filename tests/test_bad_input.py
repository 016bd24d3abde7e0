"""The bad-input sweep (issue #21): every mistake ends in one ``error:`` line and exit code 2 (or
``interrupted; nothing was written`` and 130 for Ctrl-C), before the work where it can be, and
leaves nothing half-written.

Most commands run in this process (:func:`tests.cli_runner.run_cli`, fast); the Ctrl-C tests send a
real SIGINT to a new interpreter, on purpose. Unwritable targets: the tests run as root, for whom ``chmod``
does not stop a write, so a target *under a regular file* (``file.txt/sub``) stands for an
unwritable parent (refused by the same probe), and a monkeypatched ``mkstemp`` raising ``EACCES``
for a read-only one; a full disk is a monkeypatched write raising ``ENOSPC``.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from base.errors import SurgeonError
from tests.cli_runner import run_cli
from tests.conftest import CORPUS, dead_pid, make_tiny_llama

NAN_TENSOR = "model.layers.1.mlp.down_proj.weight"


def one_line_error(done: subprocess.CompletedProcess) -> str:
    """The error line, after checking the shape of a user error (exit 2, one line, no traceback)."""
    err = done.stderr
    assert done.returncode == 2, err
    assert "Traceback" not in err and err.startswith("error: ") and err.strip().count("\n") == 0, err
    return err.strip()


def save(model: torch.nn.Module, tokenizer: object, out: Path) -> Path:
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)  # type: ignore[attr-defined]
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A good tiny model, one with a NaN weight, one with a config of fewer layers, one with a wrong
    intermediate_size, and a long text."""
    root = tmp_path_factory.mktemp("bad-input")
    model, tokenizer = make_tiny_llama()
    good = save(model, tokenizer, root / "good")
    with torch.no_grad():
        model.get_submodule(NAN_TENSOR.removesuffix(".weight")).weight[3, 5] = float("nan")
    nan = save(model, tokenizer, root / "nan")
    paths = {"good": good, "nan": nan}
    for name, key, value in (("layers", "num_hidden_layers", 1), ("inter", "intermediate_size", 48)):
        d = root / name
        d.mkdir()
        for f in good.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        config = json.loads((d / "config.json").read_text())
        config[key] = value
        (d / "config.json").write_text(json.dumps(config))
        paths[name] = d
    paths["text"] = root / "text.txt"
    paths["text"].write_text(CORPUS * 400)
    return paths


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --- 1. non-finite weights --------------------------------------------------------------------------------------

NAN_COMMANDS = {
    "info": ["info"],
    "eval": ["eval", "--seq-len", "16", "--windows", "2"],
    "prune": ["prune", "--method", "magnitude", "--sparsity", "0.5", "--no-eval", "--out", "{out}"],
    "prune-streamed": ["prune", "--method", "magnitude", "--sparsity", "0.5", "--no-eval", "--streaming", "--out", "{out}"],
    "onnx": ["onnx", "--out", "{out}"],
    "shrink": ["shrink", "--out", "{out}"],
    "pack": ["pack", "--format", "csr", "--out", "{out}"],
    "generate": ["generate", "--max-new-tokens", "2"],
    "bench": ["bench", "--isolation", "inline", "--no-ppl", "--prefill", "1x8", "--decode", "none", "--out", "{out}.json"],
}


@pytest.mark.parametrize("command", sorted(NAN_COMMANDS))
def test_a_nan_weight_is_refused_by_every_command(command: str, models: dict[str, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    args = [a.replace("{out}", str(out)) for a in NAN_COMMANDS[command]]
    args.insert(1, str(models["nan"]))
    done = run_cli(*args, "--quiet")
    line = one_line_error(done)  # generate and bench add "backend torch cannot run MODEL: " in front
    assert line.endswith(f" {models['nan']}: tensor {NAN_TENSOR} holds 1 NaN value(s); the checkpoint is damaged"), line
    # nothing written, no temporary left; a streamed prune keeps its hidden resume state (docs/streaming.md)
    assert listing(tmp_path) == ([".out.partial"] if command == "prune-streamed" else [])


def test_an_infinite_weight_is_named_too(tmp_path: Path) -> None:
    from base.loading import check_finite

    check_finite([("ok", torch.ones(3)), ("ids", torch.arange(3))], tmp_path)
    with pytest.raises(SurgeonError, match=r"tensor w holds 2 infinite value\(s\)"):
        check_finite([("w", torch.tensor([1.0, float("inf"), -float("inf")]))], tmp_path)


def test_onnx_parity_keeps_a_nan_difference() -> None:
    from export.onnx import _worse

    assert _worse(0.5, 0.25) == 0.5 and _worse(0.25, 0.5) == 0.5
    assert _worse(0.5, float("nan")) != _worse(0.5, float("nan"))  # NaN wins; max(0.5, nan) is 0.5
    assert _worse(float("nan"), 0.5) != _worse(float("nan"), 0.5)


def test_shrink_refuses_non_finite_logits() -> None:
    from export.pruned import _max_change

    assert _max_change(torch.zeros(2), torch.tensor([0.0, -0.5])) == 0.5
    with pytest.raises(SurgeonError, match="not finite"):
        _max_change(torch.zeros(2), torch.tensor([0.0, float("nan")]))


# --- 2. file system errors --------------------------------------------------------------------------------------

WRITERS = {
    "prune": ["prune", "{model}", "--method", "magnitude", "--sparsity", "0.5", "--no-eval", "--out", "{out}"],
    "checkpoint": ["prune", "{model}", "--method", "surgeon", "--sparsity", "0.5", "--no-eval", "--seq-len", "16",
                   "--calib-text", "{text}", "--calib-samples", "2", "--shots", "1", "--checkpoint", "{out}"],
    "onnx": ["onnx", "{model}", "--out", "{out}"],
    "shrink": ["shrink", "{model}", "--out", "{out}"],
    "pack": ["pack", "{model}", "--format", "csr", "--out", "{out}"],
    "densify": ["densify", "{model}", "--out", "{out}"],
    "bench": ["bench", "{model}", "--isolation", "inline", "--no-ppl", "--out", "{out}.json"],
    "gguf": ["gguf", "{model}", "--out", "{out}.gguf"],
}


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_a_target_under_a_file_is_refused_before_the_work(command: str, models: dict[str, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    out = blocker / "sub"
    loaded = []
    monkeypatch.setattr("base.loading._load_hf_dir", lambda *a, **k: loaded.append(a))  # the work must not start
    args = [a.format(model=models["good"], out=out, text=models["text"]) for a in WRITERS[command]]
    done = run_cli(*args, "--quiet")
    line = one_line_error(done)
    assert line.startswith("error: cannot write ") and line.endswith(f"{blocker} is not a directory"), line
    assert not loaded and listing(tmp_path) == ["file.txt"]


def test_a_read_only_parent_is_refused_before_the_work(models: dict[str, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, "touch", refuse)  # the probe file: what a read-only mount does, even to root
    loaded = []
    monkeypatch.setattr("base.loading._load_hf_dir", lambda *a, **k: loaded.append(a))
    done = run_cli("onnx", str(models["good"]), "--out", str(tmp_path / "x"), "--quiet")
    assert one_line_error(done) == f"error: cannot write output {tmp_path / 'x'}: {tmp_path}: Permission denied"
    assert not loaded


def test_disk_full_during_the_write_leaves_nothing(models: dict[str, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import PreTrainedModel

    def full(self: object, directory: str | Path, **kwargs: object) -> None:
        (Path(directory) / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    out = tmp_path / "pruned"
    done = run_cli("prune", str(models["good"]), "--method", "magnitude", "--sparsity", "0.5", "--no-eval", "--out",
                   str(out), "--quiet")
    assert one_line_error(done) == f"error: cannot write {out}: no space left on device; nothing was written"
    assert listing(tmp_path) == []


def test_a_safetensors_write_error_is_one_line_and_the_old_output_stays(tmp_path: Path) -> None:
    from safetensors import SafetensorError

    from export.checkpoint import write_atomically

    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "old.txt").write_text("old")

    def fill(tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"x")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    with pytest.raises(SurgeonError, match=r"^cannot write .*ckpt: no space left on device; nothing was written$"):
        write_atomically(out, True, fill)
    assert listing(tmp_path) == ["ckpt"] and listing(out) == ["old.txt"]


def test_the_model_cache_refuses_an_unwritable_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from base.loading import default_gguf

    default_gguf()  # the default model is installed (the project's install step)
    blocker = tmp_path / "file.txt"
    blocker.write_text("")
    monkeypatch.setenv("SURGEON_EXPORT_CACHE", str(blocker / "cache"))
    done = run_cli("info", "--quiet")
    line = one_line_error(done)
    assert f"{blocker} is not a directory (set $SURGEON_EXPORT_CACHE to a writable directory)" in line, line


def test_stale_temporaries_are_removed_on_the_next_run(tmp_path: Path) -> None:
    from export.checkpoint import write_atomically

    gone, old = dead_pid(), time.time() - 7200
    stale = tmp_path / f".out.tmp-{gone}-abcd1234"  # a kill during a write of ``out``
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    live = tmp_path / f".out.tmp-{os.getppid()}-abcd1234"  # a live process's write: kept
    live.mkdir()
    fresh = tmp_path / f".out.tmp-{gone}-efgh5678"  # newer than this process: kept
    fresh.mkdir()
    foreign = tmp_path / ".out.tmp-mine"  # not our pattern: kept
    foreign.mkdir()
    for p in (stale, live, foreign):
        os.utime(p, (old, old))
    os.utime(fresh, (time.time() + 60, time.time() + 60))
    write_atomically(tmp_path / "out", False, lambda tmp: (tmp / "f").write_text("new"))
    assert listing(tmp_path) == sorted([live.name, fresh.name, foreign.name, "out"])


# --- 4. tracebacks and silent acceptances -------------------------------------------------------------------------


def test_bad_devices(models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    done = run_cli("generate", str(models["good"]), "--device", "tpu", "--quiet")
    assert one_line_error(done) == "error: --device tpu: choose cpu, cuda or cuda:N"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    done = run_cli("generate", str(models["good"]), "--device", "cuda", "--quiet")
    assert one_line_error(done) == "error: --device cuda: no CUDA GPU is visible"
    done = run_cli("bench", str(models["good"]), "--device", "tpu", "--quiet")
    assert one_line_error(done) == "error: --device tpu: choose cpu, cuda or cuda:N"


def test_chat_without_a_template(models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    done = run_cli("generate", str(models["good"]), "--chat", "--quiet")
    assert one_line_error(done) == "error: --chat: this model's tokenizer has no chat template"
    from runtime.generate import encode_prompts
    from tests.conftest import make_tokenizer

    tokenizer = make_tokenizer()
    tokenizer.chat_template = "{% if messages %}{{ messages[0]['content'] }}"  # no endif: a broken template
    with pytest.raises(SurgeonError, match="^--chat: the tokenizer's chat template cannot be applied: "):
        encode_prompts(tokenizer, ["hi"], chat=True)


def test_opset_outside_14_to_20_is_refused_at_parse_time(models: dict[str, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    for opset, bound in (("10", "greater than or equal to 14"), ("21", "less than or equal to 20")):
        done = run_cli("onnx", str(models["good"]), "--opset", opset, "--out", str(tmp_path / "o"))
        assert one_line_error(done) == f"error: Invalid value for '--opset': Input should be {bound}"
    assert listing(tmp_path) == []


def test_out_over_the_working_directory_or_the_source_is_refused(models: dict[str, Path], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for out in (".", str(tmp_path.parent)):
        done = run_cli("shrink", str(models["good"]), "--out", out, "--force", "--quiet")
        assert "it is the working directory, one of its parents or the home directory" in one_line_error(done)
    for out in (models["good"], models["good"].parent):
        done = run_cli("onnx", str(models["good"]), "--out", str(out), "--force", "--quiet")
        assert one_line_error(done) == f"error: refusing to write over {out}: it holds the input model {models['good']}"
    assert (models["good"] / "model.safetensors").is_file()


def test_align_is_checked_before_the_pruning(models: dict[str, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import surgeon_export.api as api

    pruned = []
    monkeypatch.setattr(api, "prune", lambda *a, **k: pruned.append(a))
    base = ["prune", str(models["good"]), "--method", "surgeon", "--structured", "0.8", "--no-eval", "--quiet"]
    for align in ("0", "-4"):
        done = run_cli(*base, "--out", str(tmp_path / "o"), "--align", align)
        assert one_line_error(done) == "error: Invalid value for '--align': Input should be greater than or equal to 1"
    done = run_cli(*base, "--out", str(tmp_path / "o"), "--align", "4096")
    assert one_line_error(done) == "error: --align 4096: layer 0 has only 64 MLP channels"
    done = run_cli(*base, "--out", str(tmp_path / "o"), "--align", "7")
    assert one_line_error(done) == ("error: --align 7: layer 0 has 2 KV heads; aligned attention widths "
                                         "need multiples of 7 KV heads")
    done = run_cli(*base, "--align", "8")
    assert one_line_error(done).startswith("error: --align rounds the sizes of a --structured run")
    assert not pruned and listing(tmp_path) == []
    done = run_cli("shrink", str(models["good"]), "--out", str(tmp_path / "s"), "--align", "0")
    assert "'--align'" in one_line_error(done)


def test_generate_beyond_the_context_is_refused(models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    done = run_cli("generate", str(models["good"]), "-p", "The quick brown fox", "--max-new-tokens", "200", "--quiet")
    line = one_line_error(done)
    assert line.endswith("plus --max-new-tokens 200 exceeds the model's context of 128 tokens; shorten the prompt "
                         "or lower --max-new-tokens"), line


def test_config_and_tensors_that_disagree_are_named(models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    done = run_cli("info", str(models["layers"]), "--quiet")
    assert one_line_error(done) == (
        f"error: {models['layers']}: tensor model.layers.1.input_layernorm.weight is not part of the model "
        "config.json describes (9 unexpected tensors, e.g. a num_hidden_layers below the stored layers)")
    done = run_cli("info", str(models["inter"]), "--quiet")
    assert one_line_error(done) == (
        f"error: {models['inter']}: tensor model.layers.0.mlp.down_proj.weight has shape [32, 64], "
        "but config.json says [32, 48] (6 tensors differ)")
    from base.lazy import open_lazy

    with pytest.raises(SurgeonError, match="tensor model.layers.1.input_layernorm.weight is not part of the model"):
        open_lazy(models["layers"])


def test_bench_refuses_to_overwrite_and_checks_every_path_first(models: dict[str, Path], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import benchmarks.run

    ran = []
    monkeypatch.setattr(benchmarks.run, "run_benchmark", lambda cfg: ran.append(cfg))
    result = tmp_path / "b.json"
    result.write_text('{"old": true}')
    done = run_cli("bench", str(models["good"]), "--out", str(result), "--quiet")
    assert one_line_error(done) == f"error: result file exists: {result} (use --force to replace it)"
    missing = tmp_path / "missing"
    done = run_cli("bench", str(models["good"]), str(missing), "--out", str(tmp_path / "c.json"), "--quiet")
    assert one_line_error(done) == f"error: model path not found: {missing}"
    assert not ran and result.read_text() == '{"old": true}'


# --- 3. Ctrl-C --------------------------------------------------------------------------------------------------


def interrupt(args: list[str], *, after: bytes | None, delay: float = 0.0, group: bool = False,
              timeout: float = 240) -> tuple[int, str]:
    """Start ``surgeon-export ARGS``, wait until ``after`` shows on stderr (or ``delay``), send SIGINT
    (to the whole process group, as a terminal's Ctrl-C does, when ``group``); exit code and stderr."""
    # SIGINT as a terminal leaves it: a shell that starts us in the background (as a CI runner may)
    # hands its children SIGINT ignored, and Python then never raises KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, "-m", "surgeon_export.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=group,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stderr is not None
    seen = b""
    if after is not None:
        os.set_blocking(proc.stderr.fileno(), False)
        deadline = time.monotonic() + timeout
        while after not in seen:
            assert proc.poll() is None, f"finished before the interrupt: {seen.decode()[-2000:]}"
            assert time.monotonic() < deadline, seen.decode()[-2000:]
            seen += proc.stderr.read() or b""
            time.sleep(0.05)
        os.set_blocking(proc.stderr.fileno(), True)
    else:
        time.sleep(delay)
    if group:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    return proc.returncode, (seen + rest).decode()


def check_interrupted(code: int, err: str) -> None:
    assert code == 130, err[-2000:]
    assert err.rstrip().endswith("interrupted; nothing was written"), err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]


def test_ctrl_c_during_eval(models: dict[str, Path]) -> None:
    code, err = interrupt(["eval", str(models["good"]), "--text", str(models["text"]), "--seq-len", "16", "--full",
                           "--batch-size", "1", "--threads", "1"], after=b"win/s")
    check_interrupted(code, err)


def test_ctrl_c_during_prune_writes_nothing(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    code, err = interrupt(["prune", str(models["good"]), "--method", "sparsegpt", "--sparsity", "0.5", "--seq-len", "16",
                           "--calib-text", str(models["text"]), "--calib-samples", "8", "--refine", "sds",
                           "--sds-epochs", "10000000", "--threads", "1", "--out", str(out)], after=b"%", group=True)
    check_interrupted(code, err)
    assert listing(tmp_path) == []


def test_ctrl_c_during_bench_stops_the_workers_quietly(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    code, err = interrupt(["bench", str(models["good"]), "--text", str(models["text"]), "--ppl-seq-len", "16",
                           "--ppl-windows", "100000", "--threads", "1", "--out", str(out)], after=b"win/s", group=True)
    check_interrupted(code, err)
    assert listing(tmp_path) == []


def test_ctrl_c_during_the_imports() -> None:
    code, err = interrupt(["info", "--quiet"], after=None, delay=1.0)
    check_interrupted(code, err)
    assert err.strip() == "interrupted; nothing was written"


def test_every_hub_style_load_refuses_remote_code() -> None:
    """A directory whose config names custom code must never run it nor stop at transformers'
    "run the custom code? [y/N]" prompt: every ``from_pretrained`` passes ``trust_remote_code=False``."""
    import ast

    root = Path(__file__).resolve().parents[1]
    missing = []
    for package in ("base", "benchmarks", "export", "runtime", "surgeon", "surgeon_export"):
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "from_pretrained"
                        and isinstance(node.func.value, ast.Name) and node.func.value.id.startswith("Auto")):
                    flag = next((k.value for k in node.keywords if k.arg == "trust_remote_code"), None)
                    if not (isinstance(flag, ast.Constant) and flag.value is False):
                        missing.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not missing, missing


def test_bench_disk_full_while_writing_results(models: dict[str, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import benchmarks.report
    import benchmarks.run

    monkeypatch.setattr(benchmarks.run, "run_benchmark", lambda cfg: {"models": []})

    def full(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)  # every result file is bytes through base.files.write_file
    monkeypatch.setattr(benchmarks.report, "markdown", lambda result: "")
    monkeypatch.setattr(benchmarks.report, "plot_quality", lambda result: None)
    monkeypatch.setattr(benchmarks.report, "plot_speedup", lambda result: None)
    out = tmp_path / "b.json"
    cfg = benchmarks.run.BenchConfig([benchmarks.run.ModelSpec("good", str(models["good"]))], ppl=None)
    with pytest.raises(SurgeonError, match=r"^cannot write .*b\.json: no space left on device; nothing was written$"):
        benchmarks.run.bench(cfg, out)
    assert listing(tmp_path) == []


def test_quiet_hides_the_gguf_conversion_bar(capsys: pytest.CaptureFixture[str]) -> None:
    """transformers' GGUF reader draws its bar with plain tqdm; under --quiet (log level WARNING) it is off."""
    import transformers.modeling_gguf_pytorch_utils as reader

    from base.loading import _gguf_bars

    original = reader.tqdm
    with _gguf_bars(False):
        list(reader.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))
    assert "de-quantizing" not in capsys.readouterr().err and reader.tqdm is original
    with _gguf_bars(True):
        list(reader.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))
    assert "de-quantizing" in capsys.readouterr().err


def test_disk_full_during_a_streamed_prune_is_one_line(models: dict[str, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk while a layer's shard is written: one line, nothing at --out, no temporary shard left."""
    from safetensors import SafetensorError

    import base.resume

    def full(tensors: dict, path: str) -> None:
        Path(path).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(base.resume, "save_file", full)  # a layer's shard
    out = tmp_path / "pruned"
    done = run_cli("prune", str(models["good"]), "--method", "magnitude", "--sparsity", "0.5",
                       "--streaming", "--no-eval", "--out", str(out), "--quiet")
    assert one_line_error(done) == f"error: cannot write {out}: no space left on device; nothing was written"
    assert not out.exists()
    assert not [p for p in tmp_path.rglob(".*.tmp-*")]  # the half-written shard is gone (the resume folder may stay)
