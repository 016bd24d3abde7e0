"""CSR/BSR parts, the compressed directory (bad input of every kind refused with the tensor named),
densify for plain transformers, the pack/densify CLI, the torch-24/torch-csr backends, and the
sparse-format benchmark's helpers."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from base.adapters import LLAMA
from base.errors import SurgeonError
from base.formats import PACK_MANIFEST_FILE, PACK_WEIGHTS_FILE
from base.integrity import tensor_checksums
from base.loading import load_model
from benchmarks import latency
from benchmarks.sparse_formats import break_even, measure_cpu, measure_cuda
from export.sparse_checkpoint import (
    PackConfig,
    densify,
    pack_checkpoint,
    read_compressed,
)
from export.sparse_csr import check_compressed, pack_bsr, pack_csr, unpack_compressed
from runtime.backend import BACKENDS, load_backend
from runtime.load import PackedBackend, load_compressed
from runtime.sparse_linear import SparseLinear, sparse_linear
from tests.cli_runner import run_cli
from tests.conftest import make_tiny_llama
from tests.test_semi_structured import IDS, pruned_24_dir

Q = "model.layers.0.self_attn.q_proj.weight"


def random_sparse(rows: int, cols: int, dtype: torch.dtype, sparsity: float = 0.7, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=gen)
    W[torch.rand(rows, cols, generator=gen) < sparsity] = 0
    W[1] = 0  # an empty row
    return W.to(dtype)


def test_csr_known_answer() -> None:
    parts = pack_csr(torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [3.0, 0.0, 4.0]]))
    assert parts["crow_indices"].tolist() == [0, 1, 1, 3]
    assert parts["col_indices"].tolist() == [1, 0, 2]
    assert parts["values"].tolist() == [2.0, 3.0, 4.0]
    assert parts["crow_indices"].dtype == torch.int32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("blocksize", [None, (2, 4), (1, 1)])
def test_csr_bsr_round_trip_exact(dtype: torch.dtype, blocksize: tuple[int, int] | None) -> None:
    W = random_sparse(8, 12, dtype)
    parts = pack_csr(W) if blocksize is None else pack_bsr(W, blocksize, "w")
    sparse = unpack_compressed(parts, (8, 12), dtype, "w", blocksize)
    assert sparse.layout == (torch.sparse_csr if blocksize is None else torch.sparse_bsr)
    assert torch.equal(sparse.to_dense(), W)


def test_bsr_blocksize_must_divide() -> None:
    with pytest.raises(SurgeonError, match=r"^layer\.w: shape \[8, 12\] is not divisible into 3x4 blocks"):
        pack_bsr(torch.zeros(8, 12), (3, 4), "layer.w")


def _corrupt(parts: dict[str, torch.Tensor], part: str, index: int, value: int) -> dict[str, torch.Tensor]:
    out = {k: v.clone() for k, v in parts.items()}
    out[part][index] = value
    return out


def test_compressed_indices_are_checked_with_the_row_named() -> None:
    W = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0], [4.0, 5.0, 0.0]])
    parts = pack_csr(W)  # crow [0, 2, 3, 5], col [0, 2, 1, 0, 1]
    cases: list[tuple[dict[str, torch.Tensor], str]] = [
        (_corrupt(parts, "crow_indices", 0, 1), "must start at 0 and never decrease \\(row 0\\)"),
        (_corrupt(parts, "crow_indices", 2, 1), "never decrease \\(row 1\\)"),
        (_corrupt(parts, "crow_indices", 3, 4), "crow_indices ends at 4 but there are 5 column indices"),
        (_corrupt(parts, "col_indices", 2, 7), "row 1: column 7 outside 0..2"),
        (_corrupt(parts, "col_indices", 4, 0), "row 2: columns not increasing"),
        ({**parts, "col_indices": parts["col_indices"].long()}, "need both int32 or both int64"),
        ({**parts, "values": parts["values"][:4]}, "values have shape \\[4\\], expected \\[5\\]"),
        ({k: v for k, v in parts.items() if k != "values"}, "part values is missing"),
    ]
    for bad, message in cases:
        with pytest.raises(SurgeonError, match=f"^t: .*{message}"):
            unpack_compressed(bad, (3, 3), torch.float32, "t")
    with pytest.raises(SurgeonError, match="crow_indices has shape \\[4\\], expected \\[5\\]"):
        check_compressed(parts["crow_indices"], parts["col_indices"], 4, 3, "t")


@pytest.mark.parametrize("blocksize", [None, (4, 4)])
def test_sparse_linear_matches_dense_linear(blocksize: tuple[int, int] | None) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    with torch.no_grad():
        linear.weight.mul_(torch.rand(8, 16) > 0.6)
    W = linear.weight.detach()
    sparse = W.to_sparse_csr() if blocksize is None else W.to_sparse_bsr(blocksize)
    module = SparseLinear(sparse, linear.bias.detach())
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(module(x), linear(x))
    torch.testing.assert_close(sparse_linear(x[0, 0], sparse), x[0, 0] @ W.T)
    assert "stored=" in repr(module)


def prune_unstructured_(model: nn.Module, sparsity: float = 0.6) -> None:
    """Zero the smallest weights of every decoder linear (magnitude, per matrix)."""
    with torch.no_grad():
        for linear in LLAMA.decoder_linears(model).values():
            W = linear.weight
            W.mul_(W.abs() > W.abs().flatten().kthvalue(int(sparsity * W.numel())).values)


@pytest.fixture
def unstructured_dir(tmp_path: Path) -> tuple[nn.Module, Path]:
    model, tokenizer = make_tiny_llama()
    prune_unstructured_(model)
    path = tmp_path / "pruned60"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, path


@pytest.mark.parametrize("layout", ["csr", "bsr"])
def test_csr_bsr_tiny_llama_through_the_runtime(unstructured_dir: tuple[nn.Module, Path], tmp_path: Path,
                                                layout: str) -> None:
    model, src = unstructured_dir
    manifest = pack_checkpoint(load_model(src), tmp_path / layout, PackConfig(layout))  # type: ignore[arg-type]
    assert manifest["decoder_linear"]["sparsity"] >= 0.59
    cm = load_compressed(tmp_path / layout)
    assert cm.kernels() == {layout: 14}
    assert all(isinstance(cm.lm.model.get_submodule(k.removesuffix(".weight")), SparseLinear) for k in cm.placements)
    with torch.no_grad():
        torch.testing.assert_close(cm.lm.model(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)
    assert cm.describe()["parameters"]["decoder_linear_zeros"] == manifest["decoder_linear"]["zeros"]
    with pytest.raises(SurgeonError, match="CPU sparse matmul has no float16 kernel"):
        load_compressed(tmp_path / layout, dtype=torch.float16)
    with pytest.raises(SurgeonError, match=f"holds {layout} weights; this backend reads 2:4"):
        load_compressed(tmp_path / layout, layouts=("2:4",))


@pytest.fixture
def packed24(tmp_path: Path) -> tuple[nn.Module, Path]:
    model, src = pruned_24_dir(tmp_path)
    out = tmp_path / "packed"
    pack_checkpoint(load_model(src), out, PackConfig("2:4"))
    return model, out


def rewrite_header(path: Path, edit: Callable[[dict], None]) -> None:
    """Rewrite a safetensors file's JSON header through ``edit``, keeping the data bytes."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def rewrite_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor], dict[str, str]], None]) -> None:
    """Rewrite a safetensors file through ``edit(tensors, metadata)``, and its checksums in the manifest (as a
    faulty writer would: the checks behind the checksums must still name what is wrong)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    tensors = load_file(str(path))
    edit(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)
    manifest = json.loads((path.parent / PACK_MANIFEST_FILE).read_text())
    manifest["checksums"] = tensor_checksums(path)
    (path.parent / PACK_MANIFEST_FILE).write_text(json.dumps(manifest))


def _packed_meta(header: dict, edit: Callable[[dict], None]) -> None:
    packed = json.loads(header["__metadata__"]["packed"])
    edit(packed)
    header["__metadata__"]["packed"] = json.dumps(packed)


BAD_INPUTS: list[tuple[str, Callable[[Path], None], str]] = [
    ("manifest version", lambda d: (d / PACK_MANIFEST_FILE).write_text(
        (d / PACK_MANIFEST_FILE).read_text().replace('"format_version": 1', '"format_version": 2')),
     "surgeon-sparse format version 2; this surgeon-export reads version 1 \\(upgrade surgeon-export\\)"),
    ("header version", lambda d: rewrite_header(d / PACK_WEIGHTS_FILE, lambda h: h["__metadata__"].update(format_version="0")),
     f"{PACK_WEIGHTS_FILE}: surgeon-sparse format version 0"),
    ("not a compressed directory", lambda d: (d / PACK_MANIFEST_FILE).unlink(), "is not a compressed checkpoint"),
    ("truncated file", lambda d: (d / PACK_WEIGHTS_FILE).write_bytes((d / PACK_WEIGHTS_FILE).read_bytes()[:-10]),
     f"corrupt or truncated safetensors file .*{PACK_WEIGHTS_FILE}"),
    ("tampered header length", lambda d: (d / PACK_WEIGHTS_FILE).write_bytes(
        b"\xff" + (d / PACK_WEIGHTS_FILE).read_bytes()[1:]), "corrupt or truncated safetensors file"),
    ("tampered tensor shape in the header", lambda d: rewrite_header(
        d / PACK_WEIGHTS_FILE, lambda h: h[f"{Q}.values"].update(shape=h[f"{Q}.values"]["shape"][::-1])),
     f"{Q}: values have shape \\[16, 32\\], expected \\[32, 16\\]"),
    ("metadata shape does not match values", lambda d: rewrite_header(
        d / PACK_WEIGHTS_FILE, lambda h: _packed_meta(h, lambda p: p[Q].update(shape=[32, 64]))),
     f"tensor {Q} has shape \\[32, 64\\], but config.json says \\[32, 32\\]"),
    ("metadata dtype does not match values", lambda d: rewrite_header(
        d / PACK_WEIGHTS_FILE, lambda h: _packed_meta(h, lambda p: p[Q].update(dtype="float16"))),
     f"{Q}: values are torch.float32, metadata says torch.float16"),
    ("metadata not JSON", lambda d: rewrite_header(
        d / PACK_WEIGHTS_FILE, lambda h: h["__metadata__"].update(packed="{not json")), "'packed' is not valid JSON"),
    ("unknown layout", lambda d: rewrite_header(
        d / PACK_WEIGHTS_FILE, lambda h: _packed_meta(h, lambda p: p[Q].update(layout="4:2"))),
     f"{Q}: unknown layout '4:2'"),
    ("another N:M layout in a 2:4 file", lambda d: rewrite_header(
        d / PACK_WEIGHTS_FILE, lambda h: _packed_meta(h, lambda p: p[Q].update(layout="3:8"))),
     f"{Q}: layout 3:8 in a 2:4 file"),
    ("layout differs from the manifest", lambda d: rewrite_header(
        d / PACK_WEIGHTS_FILE, lambda h: h["__metadata__"].update(layout="csr")),
     "header layout 'csr' does not match the manifest's '2:4'"),
    ("entry layout differs from the file's", lambda d: rewrite_header(
        d / PACK_WEIGHTS_FILE, lambda h: _packed_meta(h, lambda p: p[Q].update(layout="csr"))),
     f"{Q}: layout csr in a 2:4 file"),
    ("missing metadata part", lambda d: rewrite_tensors(d / PACK_WEIGHTS_FILE, lambda t, m: t.pop(f"{Q}.meta")),
     f"{Q}: packed part {Q}.meta is missing"),
    ("invalid positions", lambda d: rewrite_tensors(
        d / PACK_WEIGHTS_FILE, lambda t, m: t[f"{Q}.meta"][5].fill_(0x00)), f"{Q}: 2:4 metadata row 5, block 0 holds positions 0, 0"),
    ("config does not describe the tensors", lambda d: (d / "config.json").write_text(
        (d / "config.json").read_text().replace('"intermediate_size": 64', '"intermediate_size": 48')),
     "tensor model.layers.0.mlp.gate_proj.weight has shape \\[64, 32\\], but config.json says \\[48, 32\\]"),
    ("dense tensor missing", lambda d: rewrite_tensors(
        d / PACK_WEIGHTS_FILE, lambda t, m: t.pop("model.norm.weight")), "tensor model.norm.weight \\[32\\] is missing"),
    ("extra tensor", lambda d: rewrite_tensors(
        d / PACK_WEIGHTS_FILE, lambda t, m: t.update(stray=torch.zeros(2))), "tensor stray is not part of the model"),
]


@pytest.mark.parametrize("case, damage, message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_a_clear_error(packed24: tuple[nn.Module, Path], case: str,
                                    damage: Callable[[Path], None], message: str) -> None:
    _, directory = packed24
    damage(directory)
    with pytest.raises(SurgeonError, match=message):
        load_compressed(directory)
    with pytest.raises(SurgeonError, match=message):
        densify(directory, directory.parent / "dense")
    assert not (directory.parent / "dense").exists()


def test_compressed_directory_declares_itself(packed24: tuple[nn.Module, Path]) -> None:
    from transformers import AutoModelForCausalLM

    _, directory = packed24
    manifest = json.loads((directory / PACK_MANIFEST_FILE).read_text())
    assert (manifest["format"], manifest["format_version"], manifest["layout"]) == ("surgeon-sparse", 1, "2:4")
    assert "surgeon-export densify" in (directory / "README.md").read_text()
    assert not (directory / "model.safetensors").exists()
    with pytest.raises(OSError):  # plain transformers refuses it instead of loading random weights
        AutoModelForCausalLM.from_pretrained(directory)
    ckpt = read_compressed(directory)
    assert set(ckpt.packed) == {f"{n}.weight" for n in LLAMA.decoder_linears(ckpt.skeleton)}


def test_densify_loads_in_plain_transformers_with_identical_logits(packed24: tuple[nn.Module, Path]) -> None:
    from transformers import AutoModelForCausalLM

    model, directory = packed24
    result = densify(directory, directory.parent / "dense")
    assert result["layout"] == "2:4"
    dense = AutoModelForCausalLM.from_pretrained(directory.parent / "dense").eval()
    with torch.no_grad():
        assert torch.equal(dense(IDS).logits, model(IDS).logits)


def test_cli_pack_and_densify(tmp_path: Path, tiny_llama_dir: Path) -> None:
    _, src = pruned_24_dir(tmp_path)
    out = run_cli("pack", str(src), "--format", "2:4", "--dtype", "float16", "--out", str(tmp_path / "p"), "--json", "-q")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["bytes"]["decoder_linear_ratio"] == 0.5625 and result["dtype"] == "float16"
    out = run_cli("densify", str(tmp_path / "p"), "--out", str(tmp_path / "d"), "-q")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "d" / "model.safetensors").is_file()
    out = run_cli("pack", str(tiny_llama_dir), "--out", str(tmp_path / "bad"), "-q")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith(f"error: {Q}: not 2:4 sparse: row 0")
    assert not (tmp_path / "bad").exists()


def test_backends_are_registered_and_describe(packed24: tuple[nn.Module, Path], tmp_path: Path) -> None:
    assert {"torch-24", "torch-24-sparse", "torch-csr"} <= set(BACKENDS)
    _, directory = packed24
    backend = load_backend("torch-24", directory)
    assert isinstance(backend, PackedBackend) and backend.name == "torch-24"
    described = backend.describe()
    assert {"source", "path", "bytes_on_disk", "weight_bytes", "parameters", "sparsity", "pruning", "dtype",
            "flops_per_token"} <= set(described)
    assert described["kernels"] == {"dense": 14} and described["sparsity"] >= 0.5
    assert latency.time_prefill(backend, latency.synthetic_prompt(1, 8, backend.vocab_size, seed=0)) > 0
    with pytest.raises(SurgeonError, match="backend torch-csr cannot run .* holds 2:4 weights"):
        load_backend("torch-csr", directory)
    with pytest.raises(SurgeonError, match="needs a directory written by `surgeon-export pack`"):
        load_backend("torch-24", None)


def test_bench_runs_the_sparse_backends(packed24: tuple[nn.Module, Path], tmp_path: Path) -> None:
    from benchmarks.run import BenchConfig, ModelSpec, run_benchmark

    model, directory = packed24
    dense = directory.parent / "pruned24"
    cfg = BenchConfig(models=[ModelSpec("dense", str(dense)), ModelSpec("24", str(directory), "torch-24")],
                      prefill=[(1, 8)], decode=[1], prompt_len=4, new_tokens=2, repeat=5, ppl=None,
                      isolation="inline", progress=False)
    result = run_benchmark(cfg)
    packed = result["models"][1]
    assert packed["artefact"]["format"] == "2:4" and packed["prefill"][0]["status"] == "ok"
    assert packed["ratios"]["remaining_decoder_linear"] == pytest.approx(1.0)
    from benchmarks.report import markdown

    text = markdown(result)
    assert "- **24** (torch-24): dense 14" in text  # on CPU every packed linear runs dense
    packed["artefact"].update(kernels={"cusparselt": 10, "dense": 4}, fallbacks={"k": "sm90: why"},
                              dense_below={"a": 32, "b": 32, "c": 8})
    assert ("- **24** (torch-24): cusparselt 10, dense 4; 1 left dense on the GPU, e.g. sm90: why; "
            "dense copy for calls under 8 tokens (1 layers), 32 tokens (2 layers)") in markdown(result)


def test_benchmark_helpers_on_a_tiny_grid() -> None:
    rows = measure_cpu(shapes=((16, 32),), tokens=(1,), sparsities=(0.5, 0.99), repeat=5)
    assert [r["sparsity"] for r in rows] == [0.5, 0.99]
    assert all(r["dense_s"]["n"] == 5 and r["ratio"] > 0 for r in rows)
    fake = [{"shape": [4, 4], "tokens": 1, "sparsity": s, "ratio": q} for s, q in [(0.5, 2.0), (0.9, 0.8), (0.99, 0.5)]]
    assert break_even(fake)[0]["from_sparsity"] == 0.9
    fake[1]["ratio"] = 1.1
    assert break_even(fake)[0]["from_sparsity"] == 0.99
    cuda = measure_cuda(shapes=((128, 128),), tokens=(16,), repeat=5)
    if torch.cuda.is_available():  # the GPU run (benchmarks/gpu_check.py): timed rows with speed-ups
        assert cuda["status"] == "ok" and [r["shape"] for r in cuda["rows"]] == [[128, 128]]
        assert all(x > 0 for r in cuda["rows"] for x in r["speedup"].values())
    else:
        assert cuda == {"status": "skipped: no CUDA"}


def test_sparse_backends_behind_the_generate_interface(packed24: tuple[nn.Module, Path], tmp_path: Path,
                                                       unstructured_dir: tuple[nn.Module, Path]) -> None:
    from runtime.generate import GenerationConfig, generate

    _, directory = packed24
    cfg = GenerationConfig(max_new_tokens=6)
    prompts = [[1, 7, 30, 2], [5, 9]]
    dense = generate(load_backend("torch", str(directory.parent / "pruned24")), prompts, cfg)
    sparse = generate(load_backend("torch-24", str(directory)), prompts, cfg)
    assert sparse.tokens == dense.tokens
    _, src = unstructured_dir
    pack_checkpoint(load_model(src), tmp_path / "csr", PackConfig("csr"))
    csr = generate(load_backend("torch-csr", str(tmp_path / "csr")), prompts, cfg)
    assert [len(t) for t in csr.tokens] == [6, 6]
    with pytest.raises(SurgeonError, match="backend torch-csr cannot run"):
        load_backend("torch-csr", str(directory))
