"""The llama.cpp backend (runtime/llama_cpp.py) against the torch reference.

Tiny models (default run): a uniform Llama written as llama.cpp's ``llama`` and a per-layer-shape one
written as ``deci`` give the same greedy tokens as torch (batched, left-padded prompts) and logits
within a measured bound; perplexity, tokenisation, ``describe``, the bench runner, ``generate`` on the
CLI and the one-line errors. The default model (``slow``): F32, F16 and Q8_0 files and a structured
80% model against torch (greedy tokens, perplexity on 8 protocol windows, llama.cpp's own tokeniser).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from base.errors import SurgeonError
from base.perplexity import perplexity
from export.gguf import export_gguf
from runtime.backend import load_backend
from runtime.generate import GenerationConfig, generate
from tests.cli_runner import run_cli
from tests.conftest import CORPUS, make_tokenizer, tiny_llama_config
from tests.test_gguf_export import PER_LAYER_PLAN, PER_LAYER_SIZES, per_layer, save, save_gemma, with_nan

# Measured on the tiny models here (float32 weights and KV cache): max |logit difference| was about
# 1e-6 against logits of magnitude ~1 (summation order only); the bound leaves room for other CPUs.
LOGIT_ATOL = 1e-4
PROMPTS = [[5, 17, 40, 99, 3, 250, 61], [7, 8], [300, 12, 12, 12, 55, 91, 2, 140, 33, 8, 19]]
# Gemma's MLP is GELU, which ggml's CPU backend looks up in a float16 table (ggml-cpu/vec.h,
# GGML_GELU_FP16: input and output rounded to float16, relative error up to ~1e-3 per activation).
# Measured on the tiny models below: max |logit difference| 7e-4 (gemma), 1.9e-3 (gemma2), 1.2e-3
# (gemma3) against logits of magnitude 2-5; the same model with a wrong query scale, sliding window
# (+1) or local RoPE base gives 0.38 or more. 1e-2 separates the two by a factor of 5 either way.
# The error grows with depth: 1.2e-2 at 61 and 62 layers (4.4e-3 against torch with ggml's float16 GELU
# emulated), against 3.1 with llama.cpp's 62-layer query scale ignored; those use DEEP_GEMMA_LOGIT_ATOL.
GEMMA_LOGIT_ATOL = 1e-2
DEEP_GEMMA_LOGIT_ATOL = 5e-2


def needs_llama_cpp() -> None:
    """llama-cpp-python is part of the CI install (extra ``llama``): there (CI set) its absence fails the run; a
    developer who installed without the extra gets these tests skipped."""
    if os.environ.get("CI"):
        import llama_cpp  # noqa: F401
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install -e '.[llama]')")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(vocab_size=320)  # real merges, as llama.cpp's gpt2 tokenizer needs


@pytest.fixture(scope="module")
def llama_dir(tok, tmp_path_factory) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tok), max_position_embeddings=512)).eval()
    return save(model, tok, tmp_path_factory.mktemp("llama-cpp") / "tiny-llama")


@pytest.fixture(scope="module")
def deci_dir(tok, tmp_path_factory) -> Path:
    return per_layer("llama", tok, tmp_path_factory.mktemp("llama-cpp"), PER_LAYER_PLAN, max_position_embeddings=512)


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Converted files go to a cache of this test module, not the user's."""
    monkeypatch.setenv("SURGEON_EXPORT_CACHE", str(tmp_path_factory.getbasetemp() / "llama-cpp-cache"))


def greedy(backend, prompts: list[list[int]], n: int = 12) -> list[list[int]]:
    return generate(backend, prompts, GenerationConfig(max_new_tokens=n)).tokens


def compare_with_torch(directory: Path) -> tuple[float, list[list[int]]]:
    """Max |logit difference| over whole windows, and llama.cpp's greedy tokens (asserted equal to torch's)."""
    ref = load_backend("torch", directory, threads=2)
    cpp = load_backend("llama.cpp", directory, threads=2)
    windows = torch.randint(0, ref.vocab_size, (3, 64), generator=torch.Generator().manual_seed(0))
    expected, got = ref.logits(windows), cpp.logits(windows)
    assert got.shape == expected.shape and got.dtype == torch.float32
    diff = float((got - expected).abs().max())
    tokens = greedy(cpp, PROMPTS)
    assert tokens == greedy(ref, PROMPTS)
    assert greedy(cpp, PROMPTS[1:2]) == tokens[1:2]  # a row alone gets what it got in the padded batch
    return diff, tokens


def test_uniform_llama_f32_matches_torch(llama_dir: Path) -> None:
    needs_llama_cpp()
    diff, tokens = compare_with_torch(llama_dir)
    assert diff < LOGIT_ATOL
    assert len({tuple(t) for t in tokens}) > 1  # the prompts lead to different continuations


def test_per_layer_shapes_run_as_deci_and_match_torch(deci_dir: Path) -> None:
    needs_llama_cpp()
    backend = load_backend("llama.cpp", deci_dir)
    assert backend.describe()["llama_cpp"]["architecture"] == "deci"
    config = backend.config
    assert list(zip(config.layer_intermediate_sizes, config.layer_num_attention_heads,
                    config.layer_num_key_value_heads)) == PER_LAYER_SIZES
    diff, _ = compare_with_torch(deci_dir)
    assert diff < LOGIT_ATOL


@pytest.mark.parametrize("family, overrides, atol", [
    ("gemma", {}, GEMMA_LOGIT_ATOL), ("gemma2", {}, GEMMA_LOGIT_ATOL), ("gemma3_text", {}, GEMMA_LOGIT_ATOL),
    # llama.cpp's "27B" rule: at 46 (gemma2) / 62 (gemma3) layers q is scaled by 1/sqrt(hidden // heads)
    # (8 here), not 1/sqrt(head_dim) (16 here); the writer folds the difference into q.
    ("gemma2", {"layers": 46, "head_dim": 16}, DEEP_GEMMA_LOGIT_ATOL),
    ("gemma3_text", {"layers": 62, "head_dim": 16}, DEEP_GEMMA_LOGIT_ATOL),
])
def test_gemma_family_matches_torch(family: str, overrides: dict, atol: float, tmp_path: Path) -> None:
    """Windows of 64 tokens and prompts of up to 23 tokens: past the sliding window (4) of gemma2/gemma3."""
    needs_llama_cpp()
    directory = save_gemma(family, tmp_path, **overrides)
    diff, tokens = compare_with_torch(directory)
    assert diff < atol
    assert len({tuple(t) for t in tokens}) > 1


def test_gemma_gguf_is_not_read_back_through_transformers(tmp_path: Path) -> None:
    """transformers' reader takes gemma2/gemma3's query_pre_attn_scalar as 256 (our files fold the real scale into
    q) and has no gemma reader: such a file of ours is refused, not converted into another model."""
    from base.loading import resolve_model_dir

    for family in ("gemma", "gemma2", "gemma3_text"):
        path = tmp_path / f"{family}.gguf"
        export_gguf(save_gemma(family, tmp_path), path, tensor_type="f32")
        with pytest.raises(SurgeonError) as excinfo:
            resolve_model_dir(path)
        assert "transformers cannot read it back exactly" in one_line(excinfo)


def test_uniformly_shrunk_gemma3_matches_torch(tmp_path: Path) -> None:
    """Structured removal in every layer alike (MLP channels, one KV group with its 3 query heads:
    heads x head_dim = 24 < hidden 48) runs as llama.cpp's gemma3."""
    needs_llama_cpp()
    from base.adapters import get_adapter
    from base.surgery import LayerPlan, RemovalPlan
    from export.pruned import ShrinkConfig, shrink_and_save
    from tests.families import bos_tokenizer, make_model

    tok = bos_tokenizer(320)
    model = make_model("gemma3_text", dtype=torch.float32, vocab_size=len(tok), max_position_embeddings=512)
    plan = RemovalPlan({i: LayerPlan.of(channels=range(9), kv_groups=[1]) for i in range(3)})
    shrink_and_save(model, tok, get_adapter("gemma3_text"), tmp_path / "s", ShrinkConfig(check_tokens=0), plan=plan)
    backend = load_backend("llama.cpp", tmp_path / "s")
    assert backend.describe()["llama_cpp"]["architecture"] == "gemma3"
    assert (backend.config.num_attention_heads, backend.config.num_key_value_heads) == (3, 1)
    diff, _ = compare_with_torch(tmp_path / "s")
    assert diff < GEMMA_LOGIT_ATOL


def test_cache_grows_past_the_first_context(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A row longer than the context it was given: the context is re-created and the tokens replayed."""
    needs_llama_cpp()
    import runtime.llama_cpp as lc

    monkeypatch.setattr(lc, "CONTEXT_TOKENS", 256)
    ref, cpp = load_backend("torch", llama_dir), load_backend("llama.cpp", llama_dir)
    prompt = [torch.randint(0, 320, (250,), generator=torch.Generator().manual_seed(1)).tolist()]
    tokens = greedy(cpp, prompt, n=20)  # 250 + 20 positions > 256
    assert cpp.n_ctx_seq > 256
    assert tokens == greedy(ref, prompt, n=20)


def test_perplexity_through_logits(llama_dir: Path, tok) -> None:
    needs_llama_cpp()
    ids = torch.tensor(tok(CORPUS * 20, add_special_tokens=False)["input_ids"])
    ref = perplexity(load_backend("torch", llama_dir), ids, seq_len=64, max_windows=6, batch_size=4, progress=False)
    got = perplexity(load_backend("llama.cpp", llama_dir), ids, seq_len=64, max_windows=6, batch_size=4,
                     progress=False)
    assert got.tokens == ref.tokens
    assert got.perplexity == pytest.approx(ref.perplexity, rel=1e-5)


def test_llama_cpp_tokenizes_like_transformers(llama_dir: Path, tok) -> None:
    needs_llama_cpp()
    backend = load_backend("llama.cpp", llama_dir)
    text = CORPUS * 3 + "  Tabs\tand\nnew lines, 3.14159 and ümlauts."
    assert backend.tokenize(text) == tok(text, add_special_tokens=False)["input_ids"]


def test_describe_counts_like_torch(deci_dir: Path) -> None:
    needs_llama_cpp()
    cpp, ref = load_backend("llama.cpp", deci_dir).describe(), load_backend("torch", deci_dir).describe()
    assert cpp["parameters"] == ref["parameters"]
    assert cpp["flops_per_token"] == ref["flops_per_token"]
    assert cpp["dtype"] == "float32" and cpp["llama_cpp"]["kv_cache"] == "f32"
    assert cpp["bytes_on_disk"] == Path(cpp["path"]).stat().st_size
    assert cpp["llama_cpp"]["n_threads"] >= 1


def test_gguf_file_runs_in_its_own_type(llama_dir: Path, tmp_path: Path) -> None:
    """A .gguf file inside its model directory: the tokenizer comes from there; F16 runs F16 (looser logits)."""
    needs_llama_cpp()
    import shutil

    model_dir = Path(shutil.copytree(llama_dir, tmp_path / "m"))
    export_gguf(model_dir, model_dir / "model-f16.gguf", tensor_type="f16")
    backend = load_backend("llama.cpp", model_dir / "model-f16.gguf")
    facts = backend.describe()
    assert facts["dtype"] == "float16" and facts["llama_cpp"]["kv_cache"] == "f16"
    assert backend.directory == model_dir
    windows = torch.randint(0, 320, (1, 32), generator=torch.Generator().manual_seed(2))
    diff = (backend.logits(windows) - load_backend("torch", llama_dir).logits(windows)).abs().max()
    assert 0 < float(diff) < 0.05  # F16 weights, activations and cache: not exact, but close
    with pytest.raises(SurgeonError, match="type it was written in"):
        load_backend("llama.cpp", model_dir / "model-f16.gguf", dtype="float32")
    assert load_backend("llama.cpp", llama_dir, dtype="float16").describe()["dtype"] == "float16"


def one_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_missing_llama_cpp_names_the_install_line(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import runtime.llama_cpp as lc

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    with pytest.raises(SurgeonError) as excinfo:
        load_backend("llama.cpp", llama_dir)
    assert lc.INSTALL_LINE in one_line(excinfo) and "CMAKE_ARGS=" in lc.INSTALL_LINE


def test_unrunnable_files_are_one_line_errors(llama_dir: Path, tmp_path: Path) -> None:
    needs_llama_cpp()
    import shutil

    import gguf

    model_dir = Path(shutil.copytree(llama_dir, tmp_path / "m"))
    writer = gguf.GGUFWriter(str(model_dir / "alien.gguf"), "alienformer")  # an architecture llama.cpp lacks
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", torch.zeros(320, 32).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(SurgeonError) as excinfo:
        load_backend("llama.cpp", model_dir / "alien.gguf")
    assert "llama.cpp cannot load" in one_line(excinfo) and "unknown model architecture: 'alienformer'" in one_line(excinfo)

    export_gguf(model_dir, model_dir / "cut.gguf", tensor_type="f32")
    data = (model_dir / "cut.gguf").read_bytes()
    (model_dir / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(SurgeonError) as excinfo:
        load_backend("llama.cpp", model_dir / "cut.gguf")
    assert "cut.gguf" in one_line(excinfo)

    (model_dir / "text.gguf").write_text("not a model")
    with pytest.raises(SurgeonError, match="not a GGUF file"):
        load_backend("llama.cpp", model_dir / "text.gguf")
    with pytest.raises(SurgeonError, match="CPU|no CUDA GPU is visible"):
        load_backend("llama.cpp", llama_dir, device="cuda")


def test_nan_checkpoint_is_refused_like_torch(llama_dir: Path, tmp_path: Path) -> None:
    """Issue #32: llama.cpp converted, cached and ran a checkpoint with a NaN weight (empty output)."""
    needs_llama_cpp()
    import os

    bad = with_nan(llama_dir, tmp_path / "nan")
    for name in ("torch", "llama.cpp"):
        with pytest.raises(SurgeonError) as excinfo:
            load_backend(name, bad)
        assert "tensor model.layers.1.mlp.up_proj.weight holds 1 NaN value(s)" in one_line(excinfo)
    cache = Path(os.environ["SURGEON_EXPORT_CACHE"]) / "llama.cpp"
    assert not list(cache.glob("nan-*"))  # nothing converted or cached


def test_info_on_damaged_gguf_files_is_one_line(llama_dir: Path, tmp_path: Path) -> None:
    """Issue #32: a NaN or a changed tensor type in a GGUF file ended `info` in a traceback. Ours are caught by
    their checksums (the tensor named); another writer's (no checksums) by the NaN check after reading."""
    import gguf

    from base.loading import resolve_model_dir

    def damaged(name: str, foreign: bool, change) -> Path:
        path = tmp_path / name
        export_gguf(llama_dir, path, tensor_type="f32")
        reader = gguf.GGUFReader(str(path), "r+")
        if foreign:  # rename our checksum keys (same length): a file as another writer leaves it
            for key in ("surgeon.tensor_sha256", "surgeon.metadata_sha256"):
                reader.fields[key].parts[1][:7] = np.frombuffer(b"foreign", dtype=np.uint8)
        change(next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight"))
        reader.data.flush()
        del reader
        return path

    def nan(t) -> None:
        t.data[2, 3] = np.nan

    def as_f16(t) -> None:
        t.field.parts[4][0] = int(gguf.GGMLQuantizationType.F16)

    expected = {
        ("ours-nan.gguf", False, nan): "tensor blk.0.ffn_up.weight does not match its checksum",
        ("ours-type.gguf", False, as_f16): "tensor blk.0.ffn_up.weight does not match its checksum",
        ("foreign-nan.gguf", True, nan): "holds 1 NaN value(s)",
        ("foreign-type.gguf", True, as_f16): "",
    }
    for (name, foreign, change), message in expected.items():
        path = damaged(name, foreign, change)
        with pytest.raises(SurgeonError) as excinfo:
            resolve_model_dir(path)
        assert message in one_line(excinfo) and str(path) in str(excinfo.value)
    done = run_cli("info", str(tmp_path / "foreign-nan.gguf"), "--quiet")
    assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1


def test_bench_runner_measures_llama_cpp(llama_dir: Path, tmp_path: Path) -> None:
    """Perplexity, prefill, decode and memory through the one runner, in worker processes, threads set."""
    needs_llama_cpp()
    from benchmarks.run import BenchConfig, ModelSpec, PplConfig, bench

    text = tmp_path / "text.txt"
    text.write_text(CORPUS * 20)
    cfg = BenchConfig([ModelSpec("torch", str(llama_dir)), ModelSpec("cpp", str(llama_dir), backend="llama.cpp")],
                      threads=1, prefill=[(2, 32)], decode=[2], prompt_len=16, new_tokens=8, repeat=5,
                      ppl=PplConfig(windows=4, seq_len=64, text=str(text)), progress=False)
    result = bench(cfg, tmp_path / "bench.json")
    torch_run, cpp_run = result["models"]
    assert cpp_run["backend"] == "llama.cpp" and cpp_run["environment"]["threads"] == 1
    assert cpp_run["artefact"]["llama_cpp"]["n_threads"] == 1
    assert cpp_run["perplexity"]["perplexity"] == pytest.approx(torch_run["perplexity"]["perplexity"], rel=1e-5)
    for kind in ("prefill", "decode"):
        cell = cpp_run[kind][0]
        assert cell["status"] == "ok" and cell["seconds"]["median"] > 0 and cell["peak_memory_bytes"] > 0


def test_cli_generate_on_llama_cpp(llama_dir: Path, tmp_path: Path) -> None:
    needs_llama_cpp()
    import json

    env = {"SURGEON_EXPORT_CACHE": str(tmp_path / "cache")}
    prompt = "The quick brown fox"
    out = run_cli("generate", str(llama_dir), "--backend", "llama.cpp", "--prompt", prompt, "--max-new-tokens", "6",
                  "--threads", "1", "--quiet", "--json", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""  # no llama.cpp log
    cpp = json.loads(out.stdout)
    ref = json.loads(run_cli("generate", str(llama_dir), "--prompt", prompt, "--max-new-tokens", "6", "--threads", "1",
                             "--quiet", "--json", env=env).stdout)
    assert cpp["outputs"][0]["tokens"] == ref["outputs"][0]["tokens"]
    bad = run_cli("generate", str(tmp_path / "none.gguf"), "--backend", "llama.cpp", "--prompt", "x", "--quiet", env=env)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: ")


# --- the default model (slow): F32, F16, Q8_0 and a structured 80% model against torch float32 ---------------


@pytest.fixture(scope="module")
def default_reference() -> tuple:
    """The default model on torch (float32, 2 threads) and its perplexity on 8 protocol windows, once."""
    needs_llama_cpp()
    from benchmarks.llama_cpp_parity import window_perplexity

    ref = load_backend("torch", None, threads=2)
    return ref, window_perplexity(ref)


def check_parity(ref_and_ppl: tuple, cpp, max_ppl_change: float, greedy_identical: bool = True) -> dict:
    from benchmarks.llama_cpp_parity import parity

    ref, ppl = ref_and_ppl
    result = parity(ref, cpp, reference=ppl)
    assert result["perplexity"]["llama_cpp"]["tokens"] == result["perplexity"]["torch"]["tokens"] == 8 * 511
    assert abs(result["perplexity"]["relative_difference"]) < max_ppl_change, result["perplexity"]
    if greedy_identical:
        assert result["greedy"]["identical"], result["greedy"]
    assert result["tokenizer"]["identical"], result["tokenizer"]
    return result


@pytest.mark.slow
def test_default_model_f32_matches_torch(default_reference: tuple) -> None:
    result = check_parity(default_reference, load_backend("llama.cpp", None, threads=2), 0.005)
    assert result["logits"]["argmax_agreement"] == 1.0


@pytest.mark.slow
def test_default_model_f16_within_one_percent(default_reference: tuple) -> None:
    cpp = load_backend("llama.cpp", None, dtype="float16", threads=2)
    assert cpp.describe()["dtype"] == "float16"
    check_parity(default_reference, cpp, 0.01, greedy_identical=False)


@pytest.mark.slow
def test_default_model_q8_0_file(default_reference: tuple, tmp_path: Path) -> None:
    """A Q8_0 file beside a link to its source directory (the tokenizer); recorded bound: 2%."""
    ref = default_reference[0]
    export_gguf(ref.directory, tmp_path / "q8.gguf", tensor_type="q8_0")
    (tmp_path / "q8").symlink_to(ref.directory, target_is_directory=True)
    cpp = load_backend("llama.cpp", tmp_path / "q8.gguf", threads=2)
    assert cpp.describe()["dtype"] == "q8_0"
    check_parity(default_reference, cpp, 0.02, greedy_identical=False)


@pytest.fixture(scope="module")
def structured_dir(tmp_path_factory) -> Path:
    """The default model pruned structured to 80% with Wanda channel scores (cheap: 4 x 256 calibration tokens),
    global allocation so that layers keep different sizes (llama.cpp's ``deci``)."""
    needs_llama_cpp()
    from surgeon_export import api

    lm = api.load()
    report = api.prune(lm, api.build_config("wanda", structured=0.8, allocation="global"), calib_samples=4,
                       seq_len=256)
    out = tmp_path_factory.mktemp("structured") / "wanda-s80"
    api.save(lm, out, report)
    return out


@pytest.mark.slow
def test_structured_default_model_runs_as_deci_and_matches_torch(structured_dir: Path) -> None:
    from benchmarks.llama_cpp_parity import window_perplexity

    cpp = load_backend("llama.cpp", structured_dir, threads=2)
    assert cpp.describe()["llama_cpp"]["architecture"] == "deci"
    ref = load_backend("torch", structured_dir, threads=2)
    check_parity((ref, window_perplexity(ref)), cpp, 0.005)
