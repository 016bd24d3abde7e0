"""Streamed pruning (one decoder layer in memory) gives exactly the whole-model result, resumes, refuses bad input."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from base.errors import SurgeonError
from base.lazy import open_lazy
from base.loading import load_model
from export.streaming import StreamedLayers
from surgeon.sds import SDSConfig
from surgeon_export import api
from tests.cli_runner import run_cli
from tests.conftest import killed_writers_temporary, make_tiny_llama, tensors

SDS = SDSConfig(epochs=3, adjust_epochs=3)


def model_dir(tmp_path: Path, **overrides: object) -> Path:
    model, tokenizer = make_tiny_llama(num_hidden_layers=3, **overrides)
    path = tmp_path / "src"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def whole(src: Path, cfg: api.Config, out: Path) -> dict:
    lm = load_model(src)
    report = api.prune(lm, cfg, calib_samples=4, seq_len=16)
    return api.save(lm, out, report)


@pytest.mark.parametrize("cfg", [
    api.build_config("magnitude", sparsity=0.5),
    api.build_config("wanda", pattern="2:4"),
    api.build_config("sparsegpt", sparsity=0.5),
    api.build_config("sparsegpt", pattern="2:4", refine=SDS),
    api.build_config("wanda", sparsity=0.6, refine=SDSConfig(epochs=3, adjust_epochs=3, teacher="dense")),
    api.build_config("sparsegpt", sparsity=0.5, true_sequential=True),
], ids=["magnitude", "wanda-2:4", "sparsegpt", "sparsegpt-2:4-sds", "wanda-sds-dense-teacher", "true-sequential"])
def test_streamed_equals_whole_model(tmp_path: Path, cfg: api.Config) -> None:
    src = model_dir(tmp_path)
    reference = whole(src, cfg, tmp_path / "whole")
    written = api.prune_streamed(src, cfg, tmp_path / "streamed", calib_samples=4, seq_len=16)
    a, b = tensors(tmp_path / "whole"), tensors(tmp_path / "streamed")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert written["saved_sparsity"] == reference["saved_sparsity"] and written["streamed"] is True
    assert written["layers"] == reference["layers"]
    assert json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())["weight_map"]
    assert not list(tmp_path.glob(".streamed*"))  # nothing left beside the target
    assert load_model(tmp_path / "streamed").model.config.num_hidden_layers == 3


def test_untied_lm_head_and_bfloat16_source_keep_their_form(tmp_path: Path) -> None:
    model, tokenizer = make_tiny_llama(num_hidden_layers=3, tie_word_embeddings=False, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "src")
    api.prune_streamed(tmp_path / "src", api.build_config("wanda", sparsity=0.5), tmp_path / "out",
                       calib_samples=4, seq_len=16)
    saved = tensors(tmp_path / "out")
    assert "lm_head.weight" in saved and all(t.dtype == torch.bfloat16 for t in saved.values())
    # the layer-wise methods leave the untied head on disk; the checkpoint copies it from the source, exactly
    assert torch.equal(saved["lm_head.weight"], model.lm_head.weight.detach())
    assert torch.equal(saved["model.embed_tokens.weight"], model.model.embed_tokens.weight.detach())
    assert not api.needs_head(api.build_config("wanda", sparsity=0.5))
    assert api.needs_head(api.build_config("surgeon", pattern="2:4"))
    lazy = open_lazy(tmp_path / "src", head=False)
    assert lazy.model.lm_head.weight.is_meta and not lazy.model.model.embed_tokens.weight.is_meta
    plans = [api.memory_plan(open_lazy(tmp_path / "src", head=h), api.build_config("wanda", sparsity=0.5), 4, 16,
                             streaming=True) for h in (True, False)]
    head_bytes = 4 * model.lm_head.weight.numel()
    assert plans[0].outside - plans[1].outside == head_bytes and plans[0].whole == plans[1].whole
    assert plans[0].streamed >= plans[1].streamed
    lm = load_model(tmp_path / "out")
    q = lm.model.model.layers[1].self_attn.q_proj.weight
    assert float((q == 0).float().mean()) == pytest.approx(0.5)


def test_an_interrupted_run_resumes_to_the_same_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = model_dir(tmp_path)
    cfg = api.build_config("sparsegpt", pattern="2:4", refine=SDS)
    api.prune_streamed(src, cfg, tmp_path / "once", calib_samples=4, seq_len=16)
    real = StreamedLayers.leave

    def killed_after_layer_1(self: StreamedLayers, index: int, layer: torch.nn.Module, records: dict | None) -> None:
        real(self, index, layer, records)  # layer written, progress saved: what a kill -9 here leaves
        if index == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(StreamedLayers, "leave", killed_after_layer_1)
    with pytest.raises(KeyboardInterrupt):
        api.prune_streamed(src, cfg, tmp_path / "twice", calib_samples=4, seq_len=16)
    partial = tmp_path / ".twice.partial"
    assert sorted(p.name for p in partial.glob("*.safetensors")) == ["model-00001-of-00004.safetensors",
                                                                     "model-00002-of-00004.safetensors"]
    assert not (tmp_path / "twice").exists()
    killed = killed_writers_temporary(partial / "model-00003-of-00004.safetensors")  # a kill inside a write
    (partial / "model-00004-of-00004.safetensors").write_bytes(b"half")  # a kill before the progress named it
    monkeypatch.setattr(StreamedLayers, "leave", real)
    entered = []
    real_enter = StreamedLayers.enter
    monkeypatch.setattr(StreamedLayers, "enter", lambda self, i: entered.append((i, self.finished(i) is not None))
                        or real_enter(self, i))
    api.prune_streamed(src, cfg, tmp_path / "twice", calib_samples=4, seq_len=16)
    assert entered == [(0, True), (1, True), (2, False)]  # layers 0 and 1 were read back, not pruned again
    a, b = tensors(tmp_path / "once"), tensors(tmp_path / "twice")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not partial.exists() and not (tmp_path / "twice" / killed.name).exists()
    listing = [sorted(p.name for p in (tmp_path / d).iterdir()) for d in ("once", "twice")]
    assert listing[0] == listing[1]  # nothing a killed run left came along


def test_resume_refuses_other_settings_or_another_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = model_dir(tmp_path)

    def stop(self: StreamedLayers, index: int, layer: torch.nn.Module, records: dict | None) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(StreamedLayers, "leave", stop)
    with pytest.raises(KeyboardInterrupt):
        api.prune_streamed(src, api.build_config("wanda", sparsity=0.5), tmp_path / "out", calib_samples=4, seq_len=16)
    monkeypatch.undo()
    with pytest.raises(SurgeonError, match=r"made with other settings \(config.sparsity, seed\); rerun"):
        api.prune_streamed(src, api.build_config("wanda", sparsity=0.6), tmp_path / "out", calib_samples=4,
                           seq_len=16, seed=1)
    other, tokenizer = make_tiny_llama(seed=5, num_hidden_layers=3)
    other.save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    with pytest.raises(SurgeonError, match="made with another model; rerun"):
        api.prune_streamed(tmp_path / "other", api.build_config("wanda", sparsity=0.5), tmp_path / "out",
                           calib_samples=4, seq_len=16)


def test_bad_input(tmp_path: Path) -> None:
    src = model_dir(tmp_path)
    with pytest.raises(SurgeonError, match="LLM Surgeon with --refine sds or --lora-between-shots does not run streamed"):
        api.prune_streamed(src, api.build_config("surgeon", pattern="2:4", refine=SDS), tmp_path / "out")
    lazy = open_lazy(src)
    with pytest.raises(SurgeonError, match=r"--max-memory 0.0 MiB is below what one layer needs streamed \(500\.\d MiB: the "
                                           r"process, one layer"):
        api.memory_plan(lazy, api.build_config("wanda", sparsity=0.5), 4, 16, max_memory=1000)
    # Wanda keeps the diagonals of A only; SparseGPT every input group's A and two matrices to factorise the widest
    wanda, sparsegpt = (api.memory_plan(lazy, api.build_config(m, sparsity=0.5), 4, 16, streaming=True).streamed
                        for m in ("wanda", "sparsegpt"))
    widths = [32, 32, 32, 64]  # the tiny model's inputs of q/k/v, o, gate/up, down
    assert sparsegpt - wanda == 8 * (sum(d * d for d in widths) + 2 * 64**2) - 8 * sum(widths)
    with pytest.raises(SurgeonError, match="--max-memory must be a size"):
        api.parse_bytes("lots")
    assert api.parse_bytes("1.5GiB") == 3 * 2**29 and api.parse_bytes("512MiB") == 2**29
    need = api.memory_plan(lazy, api.build_config("wanda", sparsity=0.5), 4, 16, streaming=True)
    budget = (need.streamed + need.whole) // 2  # the streamed need fits, the whole model's does not
    plan = api.memory_plan(lazy, api.build_config("wanda", sparsity=0.5), 4, 16, max_memory=budget)
    assert plan.streaming and "allowed" in plan.reason and plan.streamed < plan.whole
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated halfway
    with pytest.raises(SurgeonError, match="corrupt or truncated safetensors file .*model.safetensors"):
        api.prune_streamed(src, api.build_config("wanda", sparsity=0.5), tmp_path / "out", calib_samples=4, seq_len=16)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_cli_streams_when_asked_and_by_budget(tmp_path: Path) -> None:
    src = model_dir(tmp_path)
    common = ["--method", "sparsegpt", "--sparsity", "0.5", "--calib-samples", "4", "--seq-len", "16", "--no-eval",
              "--json", "--quiet"]

    # a budget between the two estimates (memory_plan counts the process's ~500 MiB in both; the tiny model's
    # whole-model need is 171 KB above its streamed one): streaming is chosen
    lazy = open_lazy(src)
    plan = api.memory_plan(lazy, api.build_config("sparsegpt", sparsity=0.5), 4, 16)
    assert plan.streamed < plan.whole
    streamed = run_cli("prune", str(src), "--out", str(tmp_path / "a"), "--max-memory", str((plan.streamed + plan.whole) // 2), *common)
    assert streamed.returncode == 0, streamed.stderr
    result = json.loads(streamed.stdout)
    assert result["streamed"] and "allowed" in result["memory_plan"]["reason"]
    whole = run_cli("prune", str(src), "--out", str(tmp_path / "b"), "--no-streaming", *common)
    assert whole.returncode == 0 and "streamed" not in json.loads(whole.stdout)
    a, b = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in b)
    missing = run_cli("prune", str(src), "--streaming", *common)
    assert missing.returncode == 2 and missing.stderr.strip() == (
        "error: streamed pruning writes each layer as it is done: give --out DIR")


def test_every_streamed_layer_returns_its_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each layer, once written, goes back to the meta device and the C heap is trimmed (glibc kept freed
    layers' pages resident otherwise: 1.94 GiB instead of 1.15 on the default model's streamed Wanda)."""
    import base.env
    import base.lazy

    src = model_dir(tmp_path)
    calls: list[int] = []
    monkeypatch.setattr(base.lazy, "trim_heap", lambda: calls.append(1))
    lazy = open_lazy(src)
    api.prune_streamed(src, api.build_config("wanda", sparsity=0.5), tmp_path / "out", calib_samples=4, seq_len=16,
                       lazy=lazy)
    assert len(calls) == 3 + 1  # each of the 3 layers, and the embeddings once the first layer's inputs are taken
    assert all(p.is_meta for p in lazy.adapter.decoder_layers(lazy.model).parameters())
    assert lazy.model.get_input_embeddings().weight.is_meta
    base.env.trim_heap()  # the real one: glibc's malloc_trim here, nothing where there is none
    assert base.env._MALLOC_TRIM is not None


def test_ctrl_c_says_what_stays_and_how_to_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`prune --streaming` interrupted keeps its finished layers in .NAME.partial: the message names it, its
    size and both ways on (the same command resumes; rm -r removes it); then the same command finishes."""
    src, out = model_dir(tmp_path), tmp_path / "out"
    real = StreamedLayers.leave

    def interrupted_after_layer_1(self: StreamedLayers, index: int, layer: torch.nn.Module, records: dict | None) -> None:
        real(self, index, layer, records)
        if index == 1:
            raise KeyboardInterrupt

    def run() -> tuple[int, str]:
        done = run_cli("prune", str(src), "--method", "magnitude", "--sparsity", "0.5", "--streaming", "--out", str(out),
                       "--no-eval", "--quiet")
        return done.returncode, done.stderr

    monkeypatch.setattr(StreamedLayers, "leave", interrupted_after_layer_1)
    code, err = run()
    partial = tmp_path / ".out.partial"
    size = sum(f.stat().st_size for f in partial.rglob("*") if f.is_file())
    assert code == 130 and size > 0
    assert err.strip() == (f"interrupted; nothing was written to {out}, but {partial} ({size / 1e3:.0f} kB, the work "
                           "finished so far) is kept to resume: run the same command again to go on from there, or "
                           f"remove it (rm -r {partial}) to free the space")
    monkeypatch.setattr(StreamedLayers, "leave", real)
    code, err = run()
    assert code == 0 and not partial.exists() and (out / "config.json").is_file(), err
    from base.files import interrupted_message

    assert interrupted_message() == "interrupted; nothing was written"  # the finished run keeps nothing


def test_prune_job_one_calibration_path(tmp_path: Path) -> None:
    """api.prune_job calibrates whole-model and streamed runs alike: the same windows (so the same tensors), the
    same refusal of no windows; without a corpus the whole model samples its own text, a streamed run says why
    it cannot and what to give instead."""
    src = model_dir(tmp_path)
    cfg = api.build_config("wanda", sparsity=0.5)
    job = api.PruneJob(model=src, calib_samples=4, seq_len=16, evaluate=False)
    whole = api.prune_job(cfg, replace(job, out=tmp_path / "whole", streaming=False))
    streamed = api.prune_job(cfg, replace(job, out=tmp_path / "streamed", streaming=True))
    assert whole["calibration"] == streamed["calibration"] and streamed["streamed"] is True
    a, b = tensors(tmp_path / "whole"), tensors(tmp_path / "streamed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for streaming in (False, True):
        with pytest.raises(SurgeonError, match="^--calib-samples must be at least 1, got 0$"):
            api.prune_job(cfg, replace(job, calib_samples=0, streaming=streaming, out=tmp_path / f"none{streaming}"))
    empty = tmp_path / "no-corpus"
    empty.mkdir()
    with pytest.raises(SurgeonError, match="not found in .*: a streamed run holds one layer, so it cannot sample "
                                           "calibration text from the model itself; give --calib-text FILE"):
        api.prune_job(cfg, replace(job, data_dir=empty, streaming=True, out=tmp_path / "s2"))
    assert not (tmp_path / "s2").exists()
    generated = api.prune_job(cfg, replace(job, data_dir=empty, streaming=False, out=tmp_path / "w2"))
    assert generated["calibration"].startswith("generated by the model")
