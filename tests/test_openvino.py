"""The ``openvino`` backend against eager torch: logits with and without past, greedy tokens, the cache
passed between requests without copies, ``generate``/``bench --backend openvino``, and bad input.

Tiny Llama in two variants (stock, and per-layer shapes shrunk by surgery so every layer has its own
KV head count), exported by ``surgeon-export onnx``; the slow test runs the default model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from base.errors import SurgeonError
from benchmarks.run import BenchConfig, ModelSpec, PplConfig, run_benchmark
from runtime.backend import load_backend
from runtime.generate import GenerationConfig, generate
from tests.cli_runner import run_cli
from tests.conftest import CORPUS
from tests.conftest import cached_logits as _logits
from tests.test_onnx_export import _export_dir

VARIANTS = ("stock", "per-layer")
PROMPTS = [[5, 9, 14, 2, 33, 8, 70], [11, 3], [40, 41, 42, 43]]


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """variant -> (checkpoint, ONNX export) of a tiny Llama."""
    root = tmp_path_factory.mktemp("openvino")
    return {variant: _export_dir(root, "llama", variant) for variant in VARIANTS}


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Within 1e-4 per unit of the largest |logit| (the export's own verification bound), same argmax."""
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= 1e-4 * max(float(want.abs().max()), 1.0)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_torch_with_and_without_past(variant: str, exports: dict) -> None:
    checkpoint, out = exports[variant]
    torch_dec, ov_dec = load_backend("torch", checkpoint), load_backend("openvino", out, threads=1)
    if variant == "per-layer":
        assert len({shape[1] for shape in ov_dec.past_shapes}) > 1  # the KV head counts really differ
    ids = torch.randint(0, 90, (2, 17), generator=torch.Generator().manual_seed(1))
    cases = [[ids[:, :1]], [ids[:, :5]], [ids], [ids[:, :9], ids[:, 9:10], ids[:, 10:13], ids[:, 13:]]]
    for chunks in cases:  # prompts of 1, 5 and 17 tokens without past; 9 then 1, 3, 4 tokens with past
        _assert_close(_logits(ov_dec, chunks), _logits(torch_dec, chunks))
    step = [ids[:, :9], *(ids[:, i:i + 1] for i in range(9, 17))]  # decode one token at a time
    _assert_close(_logits(ov_dec, step), _logits(torch_dec, step))
    assert ov_dec.logits(ids).shape == (2, 17, ov_dec.vocab_size)  # whole windows (perplexity)
    _assert_close(ov_dec.logits(ids), torch_dec.logits(ids))


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_32_tokens_identical(variant: str, exports: dict) -> None:
    checkpoint, out = exports[variant]
    cfg = GenerationConfig(max_new_tokens=32)
    want = generate(load_backend("torch", checkpoint), PROMPTS, cfg)  # left-padded batch of three
    got = generate(load_backend("openvino", out), PROMPTS, cfg)
    assert got.tokens == want.tokens and all(len(t) == 32 for t in got.tokens)


def test_last_only_runs_the_head_on_the_last_position(exports: dict) -> None:
    """num_logits_to_keep is an input again (OpenVINO folds inputs with defaults into constants)."""
    _, out = exports["per-layer"]
    decoder = load_backend("openvino", out)
    assert decoder.has_keep and any("num_logits_to_keep" in port.get_names() for port in decoder.compiled.inputs)
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    full = _logits(decoder, [ids])
    decoder.reset(1)
    last = decoder.forward(ids, torch.ones(1, 5, dtype=torch.long), torch.arange(5)[None], last_only=True)
    assert last.shape == (1, 1, decoder.vocab_size)
    torch.testing.assert_close(last, full[:, -1:], rtol=0, atol=1e-5)
    # the compiled request computed one row of logits, not five
    assert list(decoder.requests[decoder.turn ^ 1].get_tensor("logits").shape) == [1, 1, decoder.vocab_size]


def test_cache_passes_between_requests_without_copy(exports: dict) -> None:
    """Each step's present tensors are the memory the other request reads as its past."""
    _, out = exports["per-layer"]
    decoder = load_backend("openvino", out)
    decoder.reset(2)
    decoder.forward(torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.ones(2, 3, dtype=torch.long), torch.arange(3).expand(2, 3))
    presents = [t.data.ctypes.data for t in decoder.past]
    assert [list(t.shape)[2] for t in decoder.past] == [3] * len(presents)
    reader = decoder.requests[decoder.turn]  # the request that runs next
    decoder.forward(torch.tensor([[7], [8]]), torch.ones(2, 4, dtype=torch.long), torch.full((2, 1), 3), last_only=True)
    assert [reader.get_tensor(name).data.ctypes.data for name in decoder.past_names] == presents
    assert [list(t.shape)[2] for t in decoder.past] == [4] * len(presents)


def test_generate_and_bench_through_the_runner(exports: dict, tmp_path: Path) -> None:
    checkpoint, out = exports["per-layer"]
    texts = {}
    for backend, model in (("torch", checkpoint), ("openvino", out)):
        run = run_cli("generate", str(model), "--backend", backend, "-p", "The quick brown", "-p", "Sparse",
                      "--max-new-tokens", "12", "--threads", "1", "--json", "--quiet")
        assert run.returncode == 0, run.stderr
        texts[backend] = [o["tokens"] for o in json.loads(run.stdout)["outputs"]]
    assert texts["torch"] == texts["openvino"] and all(texts["torch"])
    (tmp_path / "text.txt").write_text(CORPUS * 40)
    cfg = BenchConfig(
        models=[ModelSpec("torch", str(checkpoint), "torch"), ModelSpec("ov", str(out), "openvino")],
        prefill=[(1, 8)], decode=[1], prompt_len=8, new_tokens=4, isolation="inline", threads=1,
        ppl=PplConfig(windows=3, seq_len=32, text=str(tmp_path / "text.txt")), progress=False,
    )
    result = run_benchmark(cfg)
    base, ov_entry = result["models"]
    for key in ("decoder_linear", "decoder_linear_zeros"):  # ("total": the exporter stores equal norms once)
        assert ov_entry["artefact"]["parameters"][key] == base["artefact"]["parameters"][key], key
    assert ov_entry["artefact"]["onnx"]["properties"]["INFERENCE_NUM_THREADS"] == "1"
    assert ov_entry["artefact"]["flops_per_token"] == base["artefact"]["flops_per_token"]  # per-layer config read
    assert abs(ov_entry["perplexity"]["perplexity"] / base["perplexity"]["perplexity"] - 1) < 1e-4


def test_bad_input(exports: dict, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, out = exports["stock"]
    with pytest.raises(SurgeonError, match="backend openvino needs an ONNX export directory"):
        load_backend("openvino", None)
    with pytest.raises(SurgeonError, match="is not an ONNX export directory"):
        load_backend("openvino", tiny_llama_dir)
    with pytest.raises(SurgeonError, match="runs on the CPU only|no CUDA GPU is visible"):
        load_backend("openvino", out, device="cuda")
    with pytest.raises(SurgeonError, match=r"in the dtype it was exported in \(float32\), not float16"):
        load_backend("openvino", out, dtype="float16")
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if it were not installed
    with pytest.raises(SurgeonError, match=r"needs the openvino package: pip install 'surgeon-export\[openvino\]'"):
        load_backend("openvino", out)


def test_cli_without_openvino_is_one_line(exports: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    _, out = exports["stock"]
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if it were not installed
    run = run_cli("generate", str(out), "--backend", "openvino", "-p", "x")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip() == ("error: backend openvino needs the openvino package: "
                                  "pip install 'surgeon-export[openvino]' (or: pip install openvino==2026.4.1)")


@pytest.mark.slow
def test_default_model_matches_torch(default_onnx: tuple) -> None:
    """SmolLM2-135M: 32 greedy tokens identical, logits within 1e-4 per unit of the largest |logit|."""
    from runtime.torch_backend import TorchBackend

    lm, out, _ = default_onnx
    torch_dec, ov_dec = TorchBackend(lm.model), load_backend("openvino", out)
    ids = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(0))
    for chunks in ([ids[:, :7]], [ids], [ids[:, :40], ids[:, 40:41], ids[:, 41:48], ids[:, 48:]]):
        _assert_close(_logits(ov_dec, chunks), _logits(torch_dec, chunks))
    tok = lm.tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, tokenize=True, return_dict=False)
    prompts = [list(chat), tok("The history of the Roman Empire")["input_ids"]]
    cfg = GenerationConfig(max_new_tokens=32)  # no stop tokens: all 32 steps
    want = generate(torch_dec, prompts, cfg)
    got = generate(ov_dec, prompts, cfg)
    assert got.tokens == want.tokens and [len(t) for t in got.tokens] == [32, 32]


@pytest.mark.parametrize("dtype, asked", [("float32", "f32"), ("float16", "f16")])
def test_the_precision_asked_for_is_set_and_recorded(dtype: str, asked: str, tmp_path: Path) -> None:
    """OpenVINO's CPU default is bf16 on CPUs with AVX512-BF16: the export's precision is always asked
    for explicitly, and what the compiled model reports it runs in goes into describe() (the bench JSON)."""
    _, out = _export_dir(tmp_path, "llama", "stock", dtype=dtype)
    backend = load_backend("openvino", str(out), threads=1)
    assert backend.properties["INFERENCE_PRECISION_HINT"] == asked
    facts = backend.describe()["onnx"]
    ran = backend.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
    assert facts["precision_asked"] == asked and facts["precision"] == ran
    if dtype == "float32":
        assert ran == "f32"  # honoured on every CPU
