"""The benchmark runner on tiny random models: schema, ratios, skipped cells, files, decode loop."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from base.data import tokenize
from base.errors import SurgeonError
from base.loading import load_model
from base.perplexity import perplexity
from benchmarks import latency
from benchmarks.run import (
    SCHEMA_VERSION,
    BenchConfig,
    ModelSpec,
    PplConfig,
    bench,
    parse_batches,
    parse_models,
    parse_prefill,
    run_benchmark,
)
from benchmarks.worker import ProcessClient, serve
from export.checkpoint import save_checkpoint
from runtime.backend import resolve_dtype
from runtime.torch_backend import TorchBackend
from tests.conftest import CORPUS, make_tiny_llama

PRUNED_ZEROS = 3 * 64  # zeroed weights per decoder linear in the "pruned" model


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A dense tiny Llama, and a copy with 192 zeros per decoder linear saved by the real checkpoint writer."""
    root = tmp_path_factory.mktemp("bench-models")
    model, tokenizer = make_tiny_llama()
    model.save_pretrained(root / "dense")
    tokenizer.save_pretrained(root / "dense")
    lm = load_model(root / "dense")
    linears = lm.adapter.decoder_linears(lm.model)
    with torch.no_grad():
        for linear in linears.values():
            linear.weight.view(-1)[:PRUNED_ZEROS] = 0
    save_checkpoint(lm.model, lm.tokenizer, root / "pruned", {"config": {"method": "magnitude", "sparsity": 0.5}},
                    list(linears))
    (root / "text.txt").write_text(CORPUS * 40)
    return {"dense": root / "dense", "pruned": root / "pruned", "text": root / "text.txt",
            "linears": len(linears)}  # type: ignore[dict-item]


def config(paths: dict, **overrides: object) -> BenchConfig:
    kwargs: dict = dict(
        models=[ModelSpec("dense", str(paths["dense"])), ModelSpec("pruned", str(paths["pruned"]))],
        prefill=[(1, 8), (2, 16)], decode=[1, 2], prompt_len=8, new_tokens=4, isolation="inline",
        ppl=PplConfig(windows=3, seq_len=32, text=str(paths["text"])), progress=False,
    )
    kwargs.update(overrides)
    return BenchConfig(**kwargs)


@pytest.fixture(scope="module")
def result(models: dict) -> dict:
    return run_benchmark(config(models))


def test_parsers() -> None:
    assert parse_prefill("1x128, 8×512") == [(1, 128), (8, 512)]
    assert parse_prefill("none") == [] and parse_batches("1,8") == [1, 8]
    for bad in ("1x", "0x128", "axb"):
        with pytest.raises(SurgeonError, match="BATCHxLENGTH"):
            parse_prefill(bad)
    with pytest.raises(SurgeonError):
        parse_batches("1,x")
    specs = parse_models(["a/dense", "b/dense", "p=out/x", "default"], ["torch"])
    assert [s.label for s in specs] == ["dense", "dense#2", "p", "default"]
    assert specs[3].spec is None and specs[2].spec == "out/x"
    with pytest.raises(SurgeonError, match="one --backend"):
        parse_models(["a", "b", "c"], ["torch", "torch"])


def test_summarize_known_answer() -> None:
    s = latency.summarize([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (s.median, s.min, s.max, s.q1, s.q3, s.n) == (3.0, 1.0, 5.0, 2.0, 4.0, 5)
    assert s.samples == [5.0, 1.0, 4.0, 2.0, 3.0]


def test_timed_decode_matches_recomputation_without_cache() -> None:
    model, _ = make_tiny_llama(dtype=torch.float64)
    prompt = latency.synthetic_prompt(2, 6, model.config.vocab_size, seed=3)
    fed, seconds = latency.time_decode(TorchBackend(model), prompt, new_tokens=5)
    fed = torch.tensor(fed)
    seq = prompt
    with torch.no_grad():
        for _ in range(5):  # reference: full forward over the whole sequence, no KV cache
            seq = torch.cat([seq, model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert fed.shape == (2, 5) and torch.equal(fed, seq[:, 6:]) and seconds > 0


def test_schema_fields(result: dict, models: dict) -> None:
    assert result["schema_version"] == SCHEMA_VERSION and result["kind"] == "surgeon-export benchmark"
    for key in ("device", "torch", "transformers", "onnxruntime", "dtype", "threads", "date", "git_commit"):
        assert key in result["environment"]
    assert [m["label"] for m in result["models"]] == ["dense", "pruned"]
    assert [m["baseline"] for m in result["models"]] == [True, False]
    for m in result["models"]:
        assert m["memory_method"] and m["environment"]["threads"] >= 1
        assert [c["cell"] for c in m["prefill"]] == ["1x8", "2x16"]
        assert [c["cell"] for c in m["decode"]] == ["b1", "b2"]
        for kind, tokens in (("prefill", lambda c: c["batch"] * c["length"]), ("decode", lambda c: c["batch"] * 4)):
            for c in m[kind]:
                s = c["seconds"]
                assert c["status"] == "ok" and s["n"] == 5 == len(s["samples"])
                assert s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"]
                assert c["tokens_per_s"]["samples"] == pytest.approx([tokens(c) / x for x in s["samples"]])
                assert c["peak_memory_bytes"] > 0
    pruned = result["models"][1]["artefact"]
    assert pruned["parameters"]["decoder_linear_zeros"] == PRUNED_ZEROS * models["linears"]
    zeros = PRUNED_ZEROS * models["linears"]
    assert pruned["sparsity"] == zeros / pruned["parameters"]["decoder_linear"] == zeros / 18432  # 2 x 9216
    assert pruned["pruning"] == {"method": "magnitude", "sparsity": 0.5}
    assert result["models"][0]["artefact"]["pruning"] is None


def test_perplexity_matches_library(result: dict, models: dict) -> None:
    lm = load_model(models["pruned"])
    ids = tokenize(lm.tokenizer, models["text"].read_text())
    expected = perplexity(lm.model, ids, seq_len=32, max_windows=3, progress=False).perplexity
    assert result["models"][1]["perplexity"]["perplexity"] == pytest.approx(expected, rel=1e-9)


def test_ratios_equal_computed_values(result: dict) -> None:
    base, pruned = result["models"]
    r = pruned["ratios"]
    assert r["perplexity"] == pruned["perplexity"]["perplexity"] / base["perplexity"]["perplexity"]
    assert r["bytes_on_disk"] == pruned["artefact"]["bytes_on_disk"] / base["artefact"]["bytes_on_disk"]
    assert r["remaining_decoder_linear"] == pytest.approx(1 - PRUNED_ZEROS * 14 / 18432)
    for kind in ("prefill", "decode"):
        for mine, ref in zip(pruned[kind], base[kind]):
            got = r[kind][mine["cell"]]
            assert got["latency"] == mine["seconds"]["median"] / ref["seconds"]["median"]
            assert got["throughput"] == mine["tokens_per_s"]["median"] / ref["tokens_per_s"]["median"]
            paired = [a / b for a, b in zip(mine["seconds"]["samples"], ref["seconds"]["samples"])]
            assert got["latency_spread"] == [min(paired), max(paired)]
    assert all(v["latency"] == 1.0 for v in base["ratios"]["prefill"].values())


def test_files_written_atomically(result: dict, tmp_path: Path) -> None:
    from benchmarks.report import write_outputs

    written = write_outputs(dict(result), tmp_path / "run.json")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["run.json", "run.md", "run.ppl_vs_size.png", "run.speedup.png"]  # no temporary files
    assert written[-1].name == "run.json"
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "run.md").read_text()
    assert "| dense |" in md and "| pruned |" in md and "2×16" in md
    assert json.loads((tmp_path / "run.json").read_text())["outputs"]["markdown"] == "run.md"


def test_no_partial_files_when_a_measurement_raises(models: dict, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "res" / "b.json"
    out.parent.mkdir()
    out.write_text('{"old": true}')

    def broken(backend: TorchBackend, prompt: torch.Tensor, new_tokens: int) -> float:
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(latency, "time_decode", broken)
    with pytest.raises(RuntimeError, match="simulated failure"):
        bench(config(models, ppl=None), out, force=True)
    assert [p.name for p in out.parent.iterdir()] == ["b.json"] and out.read_text() == '{"old": true}'


def test_cells_that_cannot_run_are_skipped(models: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    real = latency.time_prefill

    def oom_for_pruned(backend: TorchBackend, prompt: torch.Tensor) -> float:
        if "pruned" in str(backend.directory) and prompt.shape[0] == 2:
            raise torch.OutOfMemoryError("simulated: out of memory")
        return real(backend, prompt)

    monkeypatch.setattr(latency, "time_prefill", oom_for_pruned)
    res = run_benchmark(config(models, prefill=[(1, 8), (1, 500), (10**9, 8), (2, 8)], decode=[1],
                               new_tokens=200, ppl=None))
    dense, pruned = res["models"]
    assert [c["status"] for c in dense["prefill"]] == ["ok", "skipped", "skipped", "ok"]
    assert "context" in dense["prefill"][1]["reason"] and "GiB" in dense["prefill"][2]["reason"]
    assert pruned["prefill"][3]["status"] == "skipped" and "out of memory" in pruned["prefill"][3]["reason"]
    assert "context" in dense["decode"][0]["reason"]  # 8 prompt + 200 new tokens > 128
    assert pruned["ratios"]["prefill"]["2x8"] is None and pruned["ratios"]["prefill"]["1x8"] is not None
    from benchmarks.report import markdown, plot_speedup

    assert "skipped: out of memory" in markdown(res) and plot_speedup(res) is not None


def test_bad_inputs_are_user_errors(models: dict, tmp_path: Path) -> None:
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x07")
    with pytest.raises(SurgeonError, match="backend torch cannot run .*model.onnx"):
        run_benchmark(config(models, models=[ModelSpec("dense", str(models["dense"])), ModelSpec("x", str(onnx))]))
    with pytest.raises(SurgeonError, match="unknown runtime backend 'tensorrt'"):
        run_benchmark(config(models, models=[ModelSpec("d", str(models["dense"]), "tensorrt")]))
    with pytest.raises(SurgeonError, match="at least 5"):
        run_benchmark(config(models, repeat=3))
    with pytest.raises(SurgeonError, match=r"^--dtype half: choose auto, float32, float16, bfloat16$"):
        run_benchmark(config(models, dtype="half"))


def test_dtype_choice_reaches_the_model_and_the_record(models: dict) -> None:
    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("auto", "cuda") == torch.float16
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    res = run_benchmark(config(models, dtype="bfloat16", ppl=None, prefill=[(1, 8)], decode=[],
                               models=[ModelSpec("dense", str(models["dense"]))]))
    m = res["models"][0]
    assert m["artefact"]["dtype"] == "bfloat16" and m["environment"]["dtype"] == "bfloat16"
    assert res["environment"]["dtype"] == "bfloat16" and m["prefill"][0]["status"] == "ok"
    assert res["config"]["dtype"] == "bfloat16"


def test_process_isolation(models: dict, tmp_path: Path) -> None:
    """A worker process per model (one model here, to keep it quick): same schema, per-process peak RSS."""
    cfg = config(models, isolation="process", ppl=None, prefill=[(1, 8)], decode=[],
                 models=[ModelSpec("dense", str(models["dense"]))])
    res = bench(cfg, tmp_path / "p.json")
    cell = res["models"][0]["prefill"][0]
    assert cell["status"] == "ok" and cell["peak_memory_bytes"] > 2**20
    assert res["models"][0]["ratios"]["prefill"]["1x8"]["latency"] == 1.0
    assert json.loads((tmp_path / "p.json").read_text())["config"]["isolation"] == "process"


def test_dead_worker_is_a_clear_error() -> None:
    client = ProcessClient("broken", python="/bin/false", quiet=True)
    with pytest.raises(SurgeonError, match="worker for broken exited with code 1 during load"):
        client.call({"op": "load"})
    client.close()
    with pytest.raises(SurgeonError, match="cannot start the benchmark worker for x"):
        ProcessClient("x", python="/no/such/python", quiet=True)


def test_worker_protocol_replies(models: dict) -> None:
    """User errors and bugs come back as error replies, one JSON line each; quit ends the loop."""
    requests = [{"op": "check", "batch": 1, "length": 8},  # before load: a bug, sent as a traceback
                {"op": "load", "backend": "torch", "spec": "/no/such/dir", "device": "cpu", "threads": None},
                {"op": "load", "backend": "torch", "spec": str(models["dense"]), "device": "cpu", "threads": None},
                {"op": "prefill", "batch": 1, "length": 4, "seed": 0},
                {"op": "quit"}, {"op": "never reached"}]
    replies = io.StringIO()
    serve(io.StringIO("".join(json.dumps(r) + "\n" for r in requests)), replies)
    out = [json.loads(line) for line in replies.getvalue().splitlines()]
    assert len(out) == 4
    assert out[0]["error"] == "bug" and "before load" in out[0]["message"]
    assert out[1] == {"error": "user", "message": "backend torch cannot run /no/such/dir: model path not found: /no/such/dir"}
    assert out[2]["ok"]["artefact"]["parameters"]["total"] == 26848
    assert out[3]["ok"]["seconds"] > 0 and out[3]["ok"]["peak_bytes"] > 0


def test_flops_ratio_uses_the_nearest_length() -> None:
    from benchmarks.run import _flops_ratio

    a = {"flops_per_token": {"128": 50.0, "512": 80.0}}
    b = {"flops_per_token": {"128": 100.0, "512": 100.0}}
    assert _flops_ratio(a, b, 130) == 0.5
    assert _flops_ratio(a, b, 500) == 0.8
    assert _flops_ratio({}, b, 128) is None


def test_a_nan_in_a_later_model_stops_the_run_before_anything_is_measured(models: dict, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Every model is loaded and checked (config, tensors finite) before the first measurement: an ONNX
    export holding a NaN initializer, second in the list, stops the run before the first is measured."""
    import onnx
    from onnx import numpy_helper

    from benchmarks.worker import InlineClient
    from export.onnx import OnnxConfig, export_onnx

    lm = load_model(models["dense"])
    good, bad = tmp_path / "good-onnx", tmp_path / "nan-onnx"
    export_onnx(lm.model, lm.tokenizer, good, OnnxConfig(verify=False))
    export_onnx(lm.model, lm.tokenizer, bad, OnnxConfig(verify=False))
    name = json.loads((bad / "surgeon_onnx.json").read_text())["decoder_linears"]["model.layers.1.mlp.down_proj"]["initializer"]
    proto = onnx.load(str(bad / "model.onnx"))
    tensor = next(t for t in proto.graph.initializer if t.name == name)
    array = numpy_helper.to_array(tensor).copy()
    array.flat[7] = float("nan")
    tensor.CopyFrom(numpy_helper.from_array(array, name))
    onnx.save(proto, str(bad / "model.onnx"))
    ops = []
    real = InlineClient.call
    monkeypatch.setattr(InlineClient, "call", lambda self, r: ops.append(r["op"]) or real(self, r))
    cfg = config(models, models=[ModelSpec("good", str(good), "onnxruntime"), ModelSpec("bad", str(bad), "onnxruntime")])
    with pytest.raises(SurgeonError, match=rf"nan-onnx: tensor {name} holds 1 NaN value\(s\); the checkpoint is damaged"):
        run_benchmark(cfg)
    assert ops == ["load", "load"]  # nothing measured


def test_each_runtime_compares_pruned_with_dense_on_that_runtime(models: dict, tmp_path: Path) -> None:
    """Like with like: the first model on each backend is its runtime's baseline; later ones get ratios to it
    (size, perplexity, every cell), beside the cross-runtime ratios to the first model; a runtime baseline
    run without perplexity takes the first model's, named in the ratio."""
    from benchmarks.report import markdown
    from export.onnx import OnnxConfig, export_onnx

    for name in ("dense", "pruned"):
        lm = load_model(models[name])
        export_onnx(lm.model, lm.tokenizer, tmp_path / f"{name}-onnx", OnnxConfig(verify=False))
    specs = [ModelSpec("dense", str(models["dense"])), ModelSpec("pruned", str(models["pruned"])),
             ModelSpec("dense-onnx", str(tmp_path / "dense-onnx"), "onnxruntime", perplexity=False),
             ModelSpec("pruned-onnx", str(tmp_path / "pruned-onnx"), "onnxruntime")]
    result = run_benchmark(config(models, models=specs, prefill=[(1, 8)], decode=[1]))
    dense, pruned, dense_onnx, pruned_onnx = result["models"]
    assert [m["runtime_baseline"] for m in result["models"]] == ["dense", "dense", "dense-onnx", "dense-onnx"]
    assert dense["ratios_same_runtime"] is None and dense_onnx["ratios_same_runtime"] is None
    assert dense_onnx["perplexity"] is None  # not evaluated: the same weights as dense
    assert pruned["ratios_same_runtime"] == {**pruned["ratios"], "perplexity_against": "dense"}
    same, cross = pruned_onnx["ratios_same_runtime"], pruned_onnx["ratios"]
    for kind, cell in (("prefill", "1x8"), ("decode", "b1")):
        mine, ref, base = (m[kind][0] for m in (pruned_onnx, dense_onnx, dense))
        assert same[kind][cell]["throughput"] == mine["tokens_per_s"]["median"] / ref["tokens_per_s"]["median"]
        assert same[kind][cell]["latency"] == mine["seconds"]["median"] / ref["seconds"]["median"]
        assert cross[kind][cell]["throughput"] == mine["tokens_per_s"]["median"] / base["tokens_per_s"]["median"]
    assert same["bytes_on_disk"] == pruned_onnx["artefact"]["bytes_on_disk"] / dense_onnx["artefact"]["bytes_on_disk"]
    assert same["perplexity"] == pruned_onnx["perplexity"]["perplexity"] / dense["perplexity"]["perplexity"]
    assert same["perplexity_against"] == "dense"
    md = markdown(result)
    row = (f"| pruned-onnx | onnxruntime | dense-onnx | {same['bytes_on_disk']:.3f}× | {same['perplexity']:.3f}× "
           f"(vs dense) | {same['prefill']['1x8']['throughput']:.2f}× | {same['decode']['b1']['throughput']:.2f}× |")
    assert row in md.splitlines(), md
    assert "| model | backend | against | size × | ppl × | prefill 1×8 speed-up | decode b1 speed-up |" in md


def test_a_shared_perplexity_is_checked_on_a_few_windows_first(models: dict) -> None:
    """``check_windows``: a row sharing another's perplexity measures its own on the first windows and takes
    the share only when both agree within SHARE_TOLERANCE; a row that differs is evaluated in full instead."""
    from benchmarks.report import markdown
    from benchmarks.run import SHARE_TOLERANCE

    specs = [ModelSpec("dense", str(models["dense"])), ModelSpec("pruned", str(models["pruned"])),
             ModelSpec("dense-again", str(models["dense"]), perplexity="dense", check_windows=2),
             ModelSpec("pruned-as-dense", str(models["pruned"]), perplexity="dense", check_windows=2)]
    result = run_benchmark(config(models, models=specs, prefill=[(1, 8)], decode=[1]))
    dense, pruned, again, wrong = (m["perplexity"] for m in result["models"])
    assert again["shared_from"] == "dense" and again["perplexity"] == dense["perplexity"]
    assert again["check"]["windows"] == 2 and again["check"]["relative_difference"] == 0.0  # the same model
    lm = load_model(models["dense"])  # the check's figure: the library's perplexity on the first 2 windows
    ids = tokenize(lm.tokenizer, models["text"].read_text())
    two = perplexity(lm.model, ids, seq_len=32, max_windows=2, progress=False).perplexity
    assert again["check"]["perplexity"] == pytest.approx(two, rel=1e-9) and two != dense["perplexity"]
    assert "shared_from" not in wrong and wrong["check"]["relative_difference"] > SHARE_TOLERANCE
    assert wrong["perplexity"] == pruned["perplexity"] and wrong["windows"] == 3  # measured in full, not shared
    md = markdown(result)
    assert f"{again['perplexity']:.3f} (= dense, 0.0e+00 on 2 windows)" in md
    with pytest.raises(SurgeonError, match="check_windows checks a shared perplexity"):
        run_benchmark(config(models, models=[ModelSpec("dense", str(models["dense"]), check_windows=2)]))


def test_a_cached_perplexity_is_the_measured_one_and_misses_on_any_change(
        models: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``cache_perplexity``: the first run measures and keeps the value; a second run with the same files and
    settings takes it (saying when it was measured); other settings, other weights or an unreadable cache
    entry are measured again."""
    from benchmarks.report import markdown

    monkeypatch.setenv("SURGEON_EXPORT_CACHE", str(tmp_path / "cache"))
    spec = [ModelSpec("dense", str(models["dense"]), cache_perplexity=True)]
    small = dict(models=spec, prefill=[(1, 8)], decode=[1])
    first = run_benchmark(config(models, **small))["models"][0]["perplexity"]
    assert "cached" not in first
    entries = list((tmp_path / "cache" / "perplexity").glob("*.json"))
    assert len(entries) == 1
    again = run_benchmark(config(models, **small))
    cached = again["models"][0]["perplexity"]
    assert cached["cached"]["file"] == str(entries[0]) and cached["perplexity"] == first["perplexity"]
    assert {k: v for k, v in cached.items() if k != "cached"} == first
    assert f"{first['perplexity']:.3f} (cached: measured {cached['cached']['measured'][:10]})" in markdown(again)
    other = run_benchmark(config(models, **small, ppl=PplConfig(windows=2, seq_len=32, text=str(models["text"]))))
    assert "cached" not in other["models"][0]["perplexity"] and other["models"][0]["perplexity"]["windows"] == 2
    pruned = [ModelSpec("pruned", str(models["pruned"]), cache_perplexity=True)]
    assert "cached" not in run_benchmark(config(models, **{**small, "models": pruned}))["models"][0]["perplexity"]
    entries[0].write_text("{not json")  # a damaged entry is measured again and rewritten
    remeasured = run_benchmark(config(models, **small))["models"][0]["perplexity"]
    assert "cached" not in remeasured and remeasured["perplexity"] == first["perplexity"]
    assert json.loads(entries[0].read_text())["perplexity"]["perplexity"] == first["perplexity"]
    with pytest.raises(SurgeonError, match="cache_perplexity keeps an evaluated row"):
        run_benchmark(config(models, models=[*spec, ModelSpec("again", str(models["dense"]), perplexity="dense",
                                                               cache_perplexity=True)]))
