"""ONNX export: graph I/O, parity with torch, sparsity preserved, optimum's conventions, bad input.

Every family (Llama, Qwen2, Gemma 2, Gemma 3 text, OPT) in two variants: the stock tiny model, and a
per-layer-shape (``surgeon_*``) checkpoint shrunk by surgery so every layer has its own MLP width
and head counts. STYLE.md section 5: ONNX and the runtime match eager.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from base.adapters import get_adapter
from base.errors import SurgeonError
from base.formats import ONNX_DATA_FILE, ONNX_FILE, ONNX_MANIFEST_FILE
from base.loading import load_model
from base.patterns import NMPattern
from base.surgery import layer_shapes
from export.onnx import OnnxConfig, export_onnx
from export.onnx_graph import dummy_inputs, graph_spec, optimum_past_generator
from export.pruned import ShrinkConfig, shrink_and_save
from runtime.backend import load_backend
from runtime.generate import GenerationConfig, generate
from runtime.ort import OrtBackend
from runtime.torch_backend import TorchBackend
from tests.cli_runner import run_cli
from tests.conftest import cached_logits, make_tokenizer
from tests.test_surgery import make_model
from tests.test_surgery_checkpoint import _masked

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "opt")  # every adapter
VARIANTS = ("stock", "per-layer")


def _export_dir(root: Path, family: str, variant: str, **cfg: object) -> tuple[Path, Path]:
    """A saved checkpoint of ``family``/``variant`` and its ONNX export (float32 unless ``cfg`` says)."""
    tokenizer = make_tokenizer()
    checkpoint = root / f"{family}-{variant}"
    if variant == "stock":
        model = make_model(family, dtype=torch.float32, vocab_size=len(tokenizer))
        model.save_pretrained(checkpoint)
        tokenizer.save_pretrained(checkpoint)
    else:
        model, _ = _masked(family, tokenizer)
        shrink_and_save(model, tokenizer, get_adapter(family), checkpoint, ShrinkConfig())
    lm = load_model(checkpoint)
    out = root / f"{family}-{variant}-onnx"
    export_onnx(lm.model, lm.tokenizer, out, OnnxConfig(**cfg), source=lm.source, source_dir=lm.path)  # type: ignore[arg-type]
    return checkpoint, out


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("onnx")
    return {(f, v): _export_dir(root, f, v) for f in FAMILIES for v in VARIANTS}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_torch_with_and_without_past(family: str, variant: str, exports: dict) -> None:
    checkpoint, out = exports[family, variant]
    torch_dec, ort_dec = load_backend("torch", checkpoint), OrtBackend(out)
    ids = torch.randint(0, 90, (2, 17), generator=torch.Generator().manual_seed(1))
    cases = [[ids[:, :1]], [ids[:, :5]], [ids], [ids[:, :9], ids[:, 9:10], ids[:, 10:13], ids[:, 13:]]]
    for chunks in cases:  # prompts of 1, 5 and 17 tokens without past; 9 then 1, 3, 4 tokens with past
        want, got = cached_logits(torch_dec, chunks), cached_logits(ort_dec, chunks)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_32_tokens_identical(family: str, variant: str, exports: dict) -> None:
    checkpoint, out = exports[family, variant]
    prompts = [[5, 9, 14, 2, 33, 8, 70], [11, 3], [40, 41, 42, 43]]  # left-padded into one batch
    cfg = GenerationConfig(max_new_tokens=32)
    want = generate(load_backend("torch", checkpoint), prompts, cfg)
    got = generate(OrtBackend(out), prompts, cfg)
    assert got.tokens == want.tokens and all(len(t) == 32 for t in got.tokens)


@pytest.mark.parametrize("family", ("llama", "opt"))
def test_graph_inputs_outputs_and_files(family: str, exports: dict) -> None:
    checkpoint, out = exports[family, "per-layer"]
    lm = load_model(checkpoint)
    kv = [s.num_key_value_heads for s in layer_shapes(lm.model, lm.adapter)]
    assert len(set(kv)) > 1  # per-layer KV head counts really differ
    onnx.checker.check_model(str(out / ONNX_FILE), full_check=True)
    graph = onnx.load(str(out / ONNX_FILE), load_external_data=False).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*graph.input, *graph.output]}
    assert dims["input_ids"] == dims["position_ids"] == ["batch_size", "sequence_length"]
    assert dims["attention_mask"] == ["batch_size", "past_sequence_length + sequence_length"]
    assert dims["logits"] == ["batch_size", "logits_length", lm.model.config.vocab_size]
    assert dims["num_logits_to_keep"] == [] and "num_logits_to_keep" in {t.name for t in graph.initializer}
    names = [v.name for v in graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"] and names[-1] == "num_logits_to_keep"
    for i, heads in enumerate(kv):
        for kind in ("key", "value"):
            assert dims[f"past_key_values.{i}.{kind}"] == ["batch_size", heads, "past_sequence_length", 8]
            assert dims[f"present.{i}.{kind}"] == ["batch_size", heads, "past_sequence_length + sequence_length", 8]
    assert [v.name for v in graph.output] == ["logits", *[f"present.{i}.{k}" for i in range(len(kv)) for k in ("key", "value")]]
    for name in ("config.json", "generation_config.json", "tokenizer.json", "modeling_surgeon.py", "surgeon_report.json"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / ONNX_MANIFEST_FILE).read_text())
    assert manifest["graph"]["kv_heads"] == kv and manifest["per_layer_shapes"]
    assert manifest["verification"]["max_abs_diff"] < 1e-4
    assert manifest["graph"]["simplified"]["nodes_after"] < manifest["graph"]["simplified"]["nodes_before"]


def test_tied_embedding_stored_once(exports: dict) -> None:
    _, out = exports["llama", "stock"]
    graph = onnx.load(str(out / ONNX_FILE)).graph
    vocab = json.loads((out / ONNX_MANIFEST_FILE).read_text())["graph"]["vocab_size"]
    vocab_sized = [t.name for t in graph.initializer if vocab in t.dims]
    assert vocab_sized == ["model.embed_tokens.weight"]  # read by Gather and by the LM head's Gemm


def test_optimum_generators_serve_stock_but_not_per_layer(exports: dict) -> None:
    for family in ("llama", "gemma2", "opt"):
        stock = load_model(exports[family, "stock"][0]).model
        spec = graph_spec(stock, get_adapter(family))
        pairs = optimum_past_generator(stock.config, batch=2, past=4).generate("past_key_values", framework="pt")
        assert [tuple(k.shape) for k, _ in pairs] == [spec.past_shape(i, 2, 4) for i in range(spec.num_layers)]
        per_layer = load_model(exports[family, "per-layer"][0]).model
        spec = graph_spec(per_layer, get_adapter(family))
        pairs = optimum_past_generator(per_layer.config, batch=2, past=4).generate("past_key_values", framework="pt")
        theirs = [tuple(k.shape) for k, _ in pairs]
        ours = [tuple(t.shape) for t in dummy_inputs(per_layer, spec, batch=2, past=4)[3:-1:2]]
        assert ours == [spec.past_shape(i, 2, 4) for i in range(spec.num_layers)]
        assert theirs != ours  # optimum gives every layer the config's one (unpruned) KV head count


def _weights_in_graph(out: Path) -> dict[str, np.ndarray]:
    """Every decoder linear's weight as stored in the graph, back in ``[out, in]`` layout."""
    manifest = json.loads((out / ONNX_MANIFEST_FILE).read_text())
    inits = {t.name: t for t in onnx.load(str(out / ONNX_FILE)).graph.initializer}
    weights = {}
    for module, where in manifest["decoder_linears"].items():
        array = numpy_helper.to_array(inits[where["initializer"]])
        weights[module] = array.T if where["layout"] == "[in, out]" else array
    return weights


@pytest.mark.parametrize("family", ("llama", "opt"))
def test_2_4_pattern_and_unstructured_zeros_survive_exactly(family: str, tmp_path: Path) -> None:
    tokenizer = make_tokenizer()
    adapter = get_adapter(family)
    for kind in ("2:4", "unstructured"):
        model = make_model(family, dtype=torch.float32, vocab_size=len(tokenizer))
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for linear in adapter.decoder_linears(model).values():
                scores = torch.rand(linear.weight.shape, generator=gen)
                keep = NMPattern(2, 4).mask_from_scores(scores) if kind == "2:4" else scores > 0.6
                linear.weight.mul_(keep)
        out = tmp_path / f"{family}-{kind}"
        manifest = export_onnx(model, tokenizer, out)
        weights = _weights_in_graph(out)
        for name, linear in adapter.decoder_linears(model).items():
            W = linear.weight.detach().numpy()
            assert np.array_equal(weights[name], W), name  # the very same values, zeros where they were
            if kind == "2:4":
                blocks = (weights[name].reshape(W.shape[0], -1, 4) == 0).sum(-1)  # zeros per 4 along the input
                assert (blocks >= 2).all(), name
        counted = sum(int((w == 0).sum()) for w in weights.values())
        assert manifest["parameters"]["decoder_linear_zeros"] == counted
        if kind == "2:4":
            assert manifest["blocks_2_4"]["with_two_zeros"] == manifest["blocks_2_4"]["blocks"] > 0
        else:
            assert 0.55 < manifest["sparsity"] < 0.65


def test_float16_external_data_and_optimized_graphs(tmp_path: Path) -> None:
    tokenizer = make_tokenizer()
    model = make_model("llama", dtype=torch.float32, vocab_size=len(tokenizer))
    half = export_onnx(model, tokenizer, tmp_path / "half", OnnxConfig(dtype="float16", external_data="always"))
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is untouched
    assert (tmp_path / "half" / ONNX_DATA_FILE).stat().st_size > (tmp_path / "half" / ONNX_FILE).stat().st_size
    types = {v["name"]: v["dtype"] for v in half["graph"]["inputs"] + half["graph"]["outputs"]}
    assert types["past_key_values.0.key"] == types["present.2.value"] == types["logits"] == "float16"
    onnx.checker.check_model(str(tmp_path / "half" / ONNX_FILE), full_check=True)
    assert half["verification"]["max_abs_diff"] <= half["verification"]["limit"]
    prompts = [[5, 9, 14, 2], [7, 7]]
    reference = generate(TorchBackend(model), prompts, GenerationConfig(max_new_tokens=8))
    assert generate(OrtBackend(tmp_path / "half"), prompts, GenerationConfig(max_new_tokens=8)).tokens == reference.tokens
    fused = export_onnx(model, tokenizer, tmp_path / "fused", OnnxConfig(optimize=True))
    ops = {n.op_type for n in onnx.load(str(tmp_path / "fused" / ONNX_FILE)).graph.node}
    assert "SkipSimplifiedLayerNormalization" in ops and fused["verification"]["max_abs_diff"] < 1e-4
    assert generate(OrtBackend(tmp_path / "fused"), prompts, GenerationConfig(max_new_tokens=8)).tokens == reference.tokens


def test_bad_input_is_one_line(tmp_path: Path, tiny_llama_dir: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = make_tokenizer()
    model = make_model("llama", dtype=torch.float32, vocab_size=len(tokenizer))
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=96))
    with pytest.raises(SurgeonError, match="unsupported architecture 'gpt2'"):
        export_onnx(gpt2, tokenizer, tmp_path / "gpt2")
    with pytest.raises(SurgeonError, match=r"^--opset must be 14 to 20, got 9$"):  # refused before tracing
        export_onnx(model, tokenizer, tmp_path / "old", OnnxConfig(opset=9))
    with pytest.raises(SurgeonError, match="--opset must be 14 to 20, got 21"):
        export_onnx(model, tokenizer, tmp_path / "new", OnnxConfig(opset=21))
    with pytest.raises(SurgeonError, match="--dtype must be one of float32, float16"):
        export_onnx(model, tokenizer, tmp_path / "bf", OnnxConfig(dtype="bfloat16"))  # type: ignore[arg-type]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(SurgeonError, match="output directory is not empty"):
        export_onnx(model, tokenizer, busy)
    export_onnx(model, tokenizer, busy, force=True)
    assert (busy / ONNX_FILE).is_file() and not (busy / "keep.txt").exists()
    with pytest.raises(SurgeonError, match="is not an ONNX export directory"):
        OrtBackend(tiny_llama_dir)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directories left


def test_interrupted_export_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import export.onnx

    def interrupt(path: Path) -> None:
        assert path.is_file()  # the graph was already written, into the temporary directory
        raise KeyboardInterrupt

    monkeypatch.setattr(export.onnx, "_check", interrupt)
    tokenizer = make_tokenizer()
    with pytest.raises(KeyboardInterrupt):
        export_onnx(make_model("llama", dtype=torch.float32, vocab_size=len(tokenizer)), tokenizer, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_cli_onnx_and_generate(tmp_path: Path, tiny_llama_dir: Path) -> None:
    out = tmp_path / "tiny-onnx"
    done = run_cli("onnx", str(tiny_llama_dir), "--out", str(out), "--json", "--quiet")
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    assert payload["graph"]["opset"] == 17 and payload["verification"]["max_abs_diff"] < 1e-4
    again = run_cli("onnx", str(tiny_llama_dir), "--out", str(out))
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "output directory is not empty" in again.stderr
    missing = run_cli("onnx", str(tmp_path), "--out", str(tmp_path / "x"))
    assert missing.returncode == 2 and "not a Hugging Face model directory" in missing.stderr
    texts = {}
    for backend, model in (("torch", tiny_llama_dir), ("onnxruntime", out)):
        run = run_cli("generate", str(model), "--backend", backend, "-p", "The quick brown", "-p", "Sparse",
                      "--max-new-tokens", "12", "--json", "--quiet")
        assert run.returncode == 0, run.stderr
        texts[backend] = [o["tokens"] for o in json.loads(run.stdout)["outputs"]]
    assert texts["torch"] == texts["onnxruntime"] and all(texts["torch"])


def test_bench_backend_refuses_a_dtype_the_export_does_not_hold(exports: dict) -> None:

    _, out = exports["llama", "stock"]
    assert load_backend("onnxruntime", out, dtype="float32").describe()["dtype"] == "float32"
    with pytest.raises(SurgeonError, match=r"runs .* in the dtype it was exported in \(float32\), not float16"):
        load_backend("onnxruntime", out, dtype="float16")
