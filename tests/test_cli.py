"""The CLI as a user meets it: exit codes, one-line errors, JSON output. Commands run in this process
(tests/cli_runner.py); :func:`test_a_real_process_exits_2_with_one_line` runs them in a new interpreter
on purpose, for the real exit path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from base.data import tokenize
from base.loading import load_model
from base.perplexity import perplexity
from tests.cli_runner import run_cli, run_cli_process


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


@pytest.mark.parametrize(
    "args, message",
    [
        (("info", "/no/such/dir"), "error: model path not found: /no/such/dir"),  # a SurgeonError
        (("eval", "--bogus"), "error: No such option: --bogus"),  # click's usage error
    ],
)
def test_a_real_process_exits_2_with_one_line(args: tuple[str, ...], message: str) -> None:
    """In a new interpreter on purpose: the exit code and stderr as the interpreter's own exit leaves them."""
    out = run_cli_process(*args)
    assert out.returncode == 2 and out.stderr.startswith(message) and out.stderr.count("\n") == 1, out.stderr
    assert out.stdout == ""


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


def test_prune_structured_writes_a_smaller_model(tiny_llama_dir: Path, text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "small"
    result = run_cli(
        "prune", str(tiny_llama_dir), "--method", "surgeon", "--structured", "0.7", "--shots", "1",
        "--calib-text", str(text_file), "--calib-samples", "4", "--seq-len", "32", "--no-eval",
        "--out", str(out), "--json", "--quiet",
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["remaining_fraction"] <= 0.7 + 1e-9
    small = load_model(out)
    dense = load_model(tiny_llama_dir)
    n_small = sum(m.weight.numel() for m in small.adapter.decoder_linears(small.model).values())
    n_dense = sum(m.weight.numel() for m in dense.adapter.decoder_linears(dense.model).values())
    assert n_small / n_dense == pytest.approx(payload["remaining_fraction"])
    again = run_cli("prune", str(tiny_llama_dir), "--method", "magnitude", "--sparsity", "0.5", "--no-eval",
                    "--out", str(out), "--quiet")
    assert again.returncode == 2 and "not empty" in again.stderr


@pytest.mark.parametrize(("target", "kfac"), [(("--pattern", "2:4"), 16), (("--structured", "0.8"), None)])
def test_surgeon_takes_A_from_every_window_and_G_from_16_for_element_targets(
    target: tuple[str, str], kfac: int | None, tiny_llama_dir: Path, text_file: Path
) -> None:
    result = run_cli(
        "prune", str(tiny_llama_dir), "--method", "surgeon", *target, "--shots", "1", "--calib-text", str(text_file),
        "--calib-samples", "20", "--seq-len", "16", "--no-eval", "--json", "--quiet",
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["config"]["kfac_windows"] == kfac and payload["config"]["correlation"] == "joint"


@pytest.mark.parametrize("method", ["wanda", "surgeon"])
def test_prune_with_sds_refinement_writes_a_2_4_checkpoint(
    method: str, tiny_llama_dir: Path, text_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sds"
    result = run_cli(
        "prune", str(tiny_llama_dir), "--method", method, "--pattern", "2:4", "--refine", "sds", "--shots", "1",
        "--sds-epochs", "20", "--sds-adjust-epochs", "20", "--calib-text", str(text_file),
        "--calib-samples", "8", "--seq-len", "32", "--no-eval", "--out", str(out), "--json", "--quiet",
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    summary = payload["refine"]["summary"]
    assert summary["linears"] == 14 and summary["mean_error_used"] <= summary["mean_error"]["first"]
    assert payload["config"]["refine"]["epochs"] == 20 if method == "wanda" else True
    saved = load_model(out)
    for name, linear in saved.adapter.decoder_linears(saved.model).items():
        w = linear.weight.reshape(linear.weight.shape[0], -1, 4)
        assert bool(((w != 0).sum(-1) <= 2).all()), name


@pytest.mark.parametrize(
    "args, message",
    [
        (("--method", "sparsegpt", "--structured", "0.5"), "--structured works with"),
        (("--method", "nope", "--sparsity", "0.5"), "unknown method 'nope'"),
        (("--method", "wanda"), "give exactly one of"),
        (("--method", "wanda", "--sparsity", "1.5"), "sparsity must be in [0, 1)"),
        (("--method", "wanda", "--pattern", "4:4"), "invalid N:M pattern"),
        (("--method", "surgeon", "--sparsity", "0.5", "--fisher", "fake"), "--fisher must be one of"),
        (("--method", "wanda", "--sparsity", "0.5", "--refine", "lora"), "--refine must be one of"),
        (("--method", "wanda", "--structured", "0.5", "--refine", "sds"), "--refine sds works on unstructured"),
        (("--method", "wanda", "--sparsity", "0.5", "--refine", "sds", "--sds-l1", "-1"), "SDS l1 must be"),
        (("--method", "surgeon", "--sparsity", "0.5", "--kfac-batch", "0"), "--kfac-batch must be at least 1"),
    ],
)
def test_prune_bad_options(tiny_llama_dir: Path, args: tuple[str, ...], message: str) -> None:
    out = run_cli("prune", str(tiny_llama_dir), *args, "--no-eval", "--quiet")
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_main_job_prunes_writes_and_benchmarks(tiny_llama_dir: Path, text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "job"
    result = run_cli(
        "run", str(tiny_llama_dir), "--out", str(out), "--text", str(text_file), "--seq-len", "32",
        "--calib-samples", "4", "--ppl-windows", "2", "--structured", "0.7", "--shots", "1", "--json", "--quiet",
        "--openvino",
    )  # the default method: LLM Surgeon, the same MLP channels removed in every layer; OpenVINO asked for
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["prune"]["sparsity"] >= 0.3 - 1e-9  # what pruning removed; the saved sizes are rounded up to
    widths = {layer.mlp.gate_proj.out_features for layer in load_model(out / "pruned").model.model.layers}
    assert all(w % 8 == 0 for w in widths) and payload["remaining_fraction"] < 1.0  # multiples of 8 (run --align)
    bench = json.loads((out / "benchmark.json").read_text())
    from surgeon_export.api import installed_runtimes

    extra = {"openvino": "openvino", "llama.cpp": "llama.cpp"}
    ran = [r for r in installed_runtimes() if r not in payload["runtimes_skipped"]]
    assert "openvino" in ran or "openvino" not in installed_runtimes()
    # the tiny test tokenizer has no BPE merges, which llama.cpp needs: skipped with the reason, the job stands
    assert "llama.cpp" not in payload["runtimes_skipped"] or "merges" in payload["runtimes_skipped"]["llama.cpp"]
    suffixes = ["onnx", *(extra[r] for r in ran)]  # like with like: dense before pruned on every runtime
    assert [m["label"] for m in bench["models"]] == ["dense", "pruned", *(f"{k}-{s}" for s in suffixes
                                                                         for k in ("dense", "pruned"))]
    for dense, pruned in zip(bench["models"][2::2], bench["models"][3::2]):  # every runtime runs the same pruned model
        assert pruned["perplexity"]["perplexity"] == pytest.approx(bench["models"][1]["perplexity"]["perplexity"], rel=1e-3)
        assert dense["backend"] == pruned["backend"]
        if dense["backend"] in ("onnxruntime", "openvino"):  # the same weights as torch's rows, checked by the export
            assert dense["perplexity"]["shared_from"] == "dense" and pruned["perplexity"]["shared_from"] == "pruned"
            assert payload["onnx_parity_max_abs_logit_diff"][f"{pruned['label'].split('-')[0]}-onnx"] < 1e-3
        else:  # llama.cpp: its own kernels and file; the pruned row checked against torch on a few windows
            assert dense["perplexity"] is None and pruned["perplexity"]["check"]["windows"] >= 1
        assert pruned["runtime_baseline"] == dense["label"] and pruned["ratios_same_runtime"]["parameters"] < 1.0
    assert set(payload["stage_seconds"]) >= {"prune and save", "onnx export dense", "onnx export pruned", "benchmark"}
    assert all(m["wall_seconds"]["load"] > 0 for m in bench["models"])
    assert [m["label"] for m in bench["models"] if "perplexity" in m["wall_seconds"]] == ["dense", "pruned"]
    assert bench["models"][1]["ratios"]["parameters"] < 1.0
    assert (out / "pruned" / "config.json").is_file()
    assert payload["prune"]["config"]["scoring"] == "surgeon" and payload["prune"]["config"]["allocation"] == "uniform"
    assert len(widths) == 1
    onnx_model = bench["models"][3]
    assert onnx_model["backend"] == "onnxruntime" and (out / "pruned-onnx" / "model.onnx").is_file()
    assert (out / "dense-onnx" / "model.onnx").is_file()
    assert onnx_model["perplexity"]["perplexity"] == pytest.approx(bench["models"][1]["perplexity"]["perplexity"], rel=1e-4)
    again = run_cli("run", str(tiny_llama_dir), "--out", str(out), "--quiet")
    assert again.returncode == 2 and "not empty" in again.stderr
    wanda = run_cli("run", str(tiny_llama_dir), "--out", str(tmp_path / "job2"), "--text", str(text_file),
                    "--seq-len", "32", "--calib-samples", "4", "--ppl-windows", "2", "--structured", "0.75",
                    "--method", "wanda", "--no-onnx", "--quiet", "--json",
                    "--recover", "--recover-steps", "3", "--recover-windows", "2", "--recover-seq-len", "16")
    assert wanda.returncode == 0, wanda.stderr
    small = load_model(tmp_path / "job2" / "pruned")
    sizes = {layer.mlp.gate_proj.out_features for layer in small.model.model.layers}
    assert len(sizes) == 1 and sizes.pop() < 64
    recovered = json.loads(wanda.stdout)["recover"]  # the main job's --recover: distilled before saving, recorded
    saved = json.loads((tmp_path / "job2" / "pruned" / "surgeon_report.json").read_text())["recover"]
    assert recovered["steps"] == saved["steps"] == 3 and recovered["diverged"] is None
    assert recovered["trained_parameters"] > 0
    assert not (tmp_path / "job2" / "pruned-onnx").exists()


@pytest.mark.parametrize("streaming", ["--no-streaming", "--streaming"])
def test_uniform_target_beyond_the_mlp_channels_is_one_line(streaming: str, tiny_llama_dir: Path, text_file: Path,
                                                            tmp_path: Path) -> None:
    """``--allocation uniform`` takes MLP channels only: 20% remaining needs more than every layer's channels down to
    the floor, refused in one line (whole-model and streamed)."""
    out = tmp_path / "out"
    done = run_cli("prune", str(tiny_llama_dir), "--method", "wanda", "--structured", "0.2", "--allocation", "uniform",
                   "--calib-text", str(text_file), "--calib-samples", "4", "--seq-len", "32", "--no-eval", streaming,
                   "--out", str(out), "--quiet")
    assert done.returncode == 2, done.stderr
    assert done.stderr == "error: structured target cannot be reached with MLP channels alone under the floors\n"
    # nothing at --out; a streamed run keeps its hidden resume state, as after any failure (docs/streaming.md)
    kept = [".out.partial"] if streaming == "--streaming" else []
    assert sorted(p.name for p in tmp_path.iterdir()) == [*kept, "text.txt", "tiny-llama"]


@pytest.mark.parametrize("args, message", [
    (("prune", "--sparsity", "abc"), "error: Invalid value for '--sparsity': Input should be a valid number"),
    (("eval", "--bogus"), "error: No such option: --bogus"),
])
def test_command_line_mistakes_are_one_line(args: tuple[str, ...], message: str) -> None:
    out = run_cli(*args)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "─" not in out.stderr
    assert out.stderr.strip().startswith(message) and len(out.stderr.strip().splitlines()) == 1


def test_each_method_gets_its_measured_best_allocation() -> None:
    from surgeon.api import build_config

    assert build_config("wanda", structured=0.8).allocation == "uniform"  # 50.14 vs 202.1 with global
    assert build_config("magnitude", structured=0.8).allocation == "uniform"
    assert build_config("surgeon", structured=0.8).allocation == "global"
    assert build_config("wanda", structured=0.8, allocation="global").allocation == "global"
