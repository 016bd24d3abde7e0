"""The generate interface over torch and ONNX Runtime: greedy, sampling, stop tokens, batches, IO binding,
and the ``onnxruntime`` benchmark backend measuring the same model as ``torch``.
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import pytest
import torch

from base.errors import SurgeonError
from base.loading import load_model
from benchmarks.run import BenchConfig, ModelSpec, PplConfig, run_benchmark
from export.checkpoint import save_checkpoint
from export.onnx import export_onnx
from runtime.backend import load_backend
from runtime.generate import GenerationConfig, generate, left_pad, pick
from runtime.ort import OrtBackend
from tests.conftest import CORPUS, make_tiny_llama

PROMPTS = [[5, 9, 14, 2, 33, 8, 70], [11, 3], [40, 41, 42, 43]]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama with some zeros (saved by the real checkpoint writer), its ONNX export, a text file."""
    root = tmp_path_factory.mktemp("runtime")
    model, tokenizer = make_tiny_llama()
    lm_dir = root / "tiny"
    names = [f"model.layers.{i}.{n}" for i in range(2) for n in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    with torch.no_grad():
        for name in names:
            model.get_submodule(name).weight.view(-1)[:50] = 0
        for name, param in model.named_parameters():
            if "norm" in name:  # distinct values: the exporter stores identical constants once
                param.uniform_(0.5, 1.5)
    save_checkpoint(model, tokenizer, lm_dir, {"config": {"method": "magnitude"}}, names)
    lm = load_model(lm_dir)
    export_onnx(lm.model, lm.tokenizer, root / "tiny-onnx", source_dir=lm_dir)
    (root / "text.txt").write_text(CORPUS * 40)
    return {"torch": lm_dir, "onnx": root / "tiny-onnx", "text": root / "text.txt"}


@pytest.fixture(scope="module")
def decoders(dirs: dict) -> dict:
    return {"torch": load_backend("torch", dirs["torch"]), "onnxruntime": OrtBackend(dirs["onnx"])}


@pytest.mark.parametrize("backend", ("torch", "onnxruntime"))
def test_batch_equals_one_prompt_at_a_time(backend: str, decoders: dict) -> None:
    cfg = GenerationConfig(max_new_tokens=10)
    together = generate(decoders[backend], PROMPTS, cfg)
    alone = [generate(decoders[backend], [p], cfg).tokens[0] for p in PROMPTS]
    assert together.tokens == alone and together.steps == 9 and together.decode_seconds > 0


def test_stop_tokens_end_each_sequence_on_its_own(decoders: dict) -> None:
    free = generate(decoders["onnxruntime"], PROMPTS, GenerationConfig(max_new_tokens=12)).tokens
    stop = free[0][4]  # a token the first sequence emits at step 5
    cfg = GenerationConfig(max_new_tokens=12, stop_tokens=(stop,), pad_token_id=0)
    for backend in ("torch", "onnxruntime"):
        out = generate(decoders[backend], PROMPTS, cfg)
        for row, full, stopped in zip(out.tokens, free, out.stopped):
            cut = full.index(stop) + 1 if stop in full else len(full)
            assert row == full[:cut] and stopped == (stop in full)
        assert out.tokens[0][-1] == stop and len(out.tokens[0]) <= 5


def test_sampling_is_seeded_and_backends_draw_alike(decoders: dict) -> None:
    cfg = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=0.8, top_k=40, top_p=0.95, seed=7)
    a = generate(decoders["torch"], PROMPTS, cfg)
    b = generate(decoders["onnxruntime"], PROMPTS, cfg)
    assert a.tokens == b.tokens  # same logits, same seeded draws
    assert generate(decoders["onnxruntime"], PROMPTS, cfg).tokens == b.tokens
    other = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=0.8, seed=8)
    assert generate(decoders["onnxruntime"], PROMPTS, other).tokens != b.tokens
    greedy = generate(decoders["onnxruntime"], PROMPTS, GenerationConfig(max_new_tokens=16)).tokens
    top1 = GenerationConfig(max_new_tokens=16, do_sample=True, top_k=1, seed=3)
    assert generate(decoders["onnxruntime"], PROMPTS, top1).tokens == greedy


def test_pick_filters_known_answer() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    assert pick(logits, GenerationConfig(), gen).tolist() == [0]
    draws = {int(pick(logits, GenerationConfig(do_sample=True, top_p=0.7), gen)) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 alone is below 0.7; 0.5 + 0.3 reaches it
    draws = {int(pick(logits, GenerationConfig(do_sample=True, top_k=3), gen)) for _ in range(300)}
    assert draws == {0, 1, 2}


def test_left_pad_and_bad_settings() -> None:
    ids, mask = left_pad([[1, 2, 3], [4]], pad_token_id=9)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    for bad, message in ((GenerationConfig(max_new_tokens=0), "max_new_tokens"),
                         (GenerationConfig(temperature=0), "temperature"),
                         (GenerationConfig(top_p=1.5), "top_p")):
        with pytest.raises(SurgeonError, match=message):
            bad.validate()
    with pytest.raises(SurgeonError, match="every prompt needs at least one token"):
        left_pad([[1], []], 0)
    with pytest.raises(SurgeonError, match="unknown runtime backend 'tensorrt'"):
        load_backend("tensorrt", "x")


def test_chunked_prefill_gives_the_same_logits(dirs: dict) -> None:
    whole, chunked = OrtBackend(dirs["onnx"], prefill_tokens=0), OrtBackend(dirs["onnx"], prefill_tokens=8, min_chunk=4)
    ids, mask = left_pad([list(range(3, 20)), [7, 8, 9, 10, 11, 12]], pad_token_id=0)  # 17 tokens: 4+4+4+4+1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    results = []
    for decoder in (whole, chunked):
        decoder.reset(2)
        first = decoder.forward(ids, mask, positions, last_only=True)
        step = decoder.forward(torch.tensor([[5], [6]]), torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1),
                               positions[:, -1:] + 1, last_only=True)
        results.append((first, step))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    cfg = GenerationConfig(max_new_tokens=8)
    assert generate(chunked, PROMPTS, cfg).tokens == generate(whole, PROMPTS, cfg).tokens


def test_cache_stays_bound_between_steps(decoders: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each step's present OrtValues are the very objects bound as the next step's past (no host copy)."""
    decoder: OrtBackend = decoders["onnxruntime"]
    bound: list[tuple[str, int]] = []
    original = decoder.io.bind_ortvalue_input

    def record(name: str, value: ort.OrtValue) -> None:
        bound.append((name, value.data_ptr()))
        original(name, value)

    monkeypatch.setattr(decoder.io, "bind_ortvalue_input", record)
    decoder.reset(2)
    mask = torch.ones(2, 3, dtype=torch.long)
    decoder.forward(torch.tensor([[1, 2, 3], [4, 5, 6]]), mask, torch.arange(3).expand(2, 3))
    presents = [(v.data_ptr(), v.shape()) for v in decoder.past]
    assert all(isinstance(v, ort.OrtValue) and v.device_name() == "cpu" for v in decoder.past)
    assert all(shape[2] == 3 for _, shape in presents)
    bound.clear()
    logits = decoder.forward(torch.tensor([[7], [8]]), torch.ones(2, 4, dtype=torch.long), torch.full((2, 1), 3), last_only=True)
    past = [ptr for name, ptr in bound if name.startswith("past_key_values.")]
    assert past == [ptr for ptr, _ in presents]
    assert logits.shape == (2, 1, decoder.vocab_size) and [v.shape()[2] for v in decoder.past] == [4] * len(past)


def test_onnxruntime_benchmark_backend_measures_the_same_model(dirs: dict) -> None:
    cfg = BenchConfig(
        models=[ModelSpec("torch", str(dirs["torch"]), "torch"), ModelSpec("ort", str(dirs["onnx"]), "onnxruntime")],
        prefill=[(1, 8)], decode=[1, 2], prompt_len=8, new_tokens=4, isolation="inline",
        ppl=PplConfig(windows=3, seq_len=32, text=str(dirs["text"])), progress=False,
    )
    result = run_benchmark(cfg)
    base, ort_entry = result["models"]
    for key in ("total", "decoder_linear", "decoder_linear_zeros", "total_zeros"):
        assert ort_entry["artefact"]["parameters"][key] == base["artefact"]["parameters"][key], key
    assert ort_entry["artefact"]["parameters"]["decoder_linear_zeros"] == 14 * 50
    assert ort_entry["artefact"]["pruning"] == {"method": "magnitude"} and ort_entry["artefact"]["dtype"] == "float32"
    assert ort_entry["perplexity"]["perplexity"] == pytest.approx(base["perplexity"]["perplexity"], rel=1e-5)
    assert [c["status"] for c in ort_entry["prefill"] + ort_entry["decode"]] == ["ok"] * 3
    assert ort_entry["ratios"]["decode"]["b1"]["throughput"] > 0
    with pytest.raises(SurgeonError, match="backend onnxruntime needs an ONNX export directory"):
        run_benchmark(BenchConfig(models=[ModelSpec("d", None, "onnxruntime")], prefill=[], decode=[], ppl=None,
                                  isolation="inline", progress=False))
