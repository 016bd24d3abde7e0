"""2:4 packing: known answers, exact round trips, rejection, sizes, the kernel dispatch table, and
a pruned tiny Llama through pack -> runtime loader with identical logits. ``gpu`` tests need sm80+."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from base.adapters import LLAMA
from base.errors import SurgeonError
from base.loading import load_model
from base.patterns import NMPattern
from export.semi_structured import (
    check_24,
    mask_columns,
    meta_columns,
    nm_bytes,
    pack_24,
    pack_nm,
    packed_bytes,
    unpack_24,
    unpack_nm,
)
from export.sparse_checkpoint import PackConfig, pack_checkpoint
from runtime.load import load_compressed
from runtime.semi_structured import (
    MULTIPLE,
    PROBE_TOKENS,
    Dispatch,
    SemiStructuredLinear,
    choose_backend,
    force_cutlass,
    pad_weight,
    switch_point,
    to_semi_structured_linear,
    tuned,
    winning_tail,
)
from tests.conftest import make_tiny_llama

IDS = torch.tensor([[1, 7, 30, 2, 55, 12, 9, 40]])
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
SM80 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8
needs_sm80 = pytest.mark.skipif(not SM80, reason="needs a CUDA GPU with sm80+")


def random_24(rows: int, cols: int, dtype: torch.dtype, seed: int = 0, pattern: NMPattern = NMPattern()) -> torch.Tensor:
    """A random weight with ``pattern`` (2:4) and some blocks holding more zeros."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=gen)
    W = W * pattern.mask_from_scores(torch.rand(rows, cols, generator=gen))
    W[torch.rand(rows, cols, generator=gen) < 0.1] = 0
    return W.to(dtype)


def pruned_24_dir(tmp_path: Path, pattern: NMPattern = NMPattern(), **overrides: object) -> tuple[nn.Module, Path]:
    """A tiny Llama magnitude-pruned to ``pattern`` (2:4) in every decoder linear, saved as a normal checkpoint."""
    model, tokenizer = make_tiny_llama(**overrides)
    with torch.no_grad():
        for linear in LLAMA.decoder_linears(model).values():
            linear.weight.mul_(pattern.mask_from_scores(linear.weight.abs()))
    path = tmp_path / f"pruned{pattern.block - pattern.n_zero}{pattern.block}"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, path


def test_known_answer_1x8_row() -> None:
    W = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 0.0, 4.0]])
    values, meta = pack_24(W, "w")
    assert values.tolist() == [[1.0, 2.0, 3.0, 4.0]]
    # block 0 keeps positions 1, 3 -> nibble 1 | 3 << 2 = 0xD; block 1 keeps 0, 3 -> 0xC (high nibble)
    assert meta.dtype == torch.uint8 and meta.tolist() == [[0xCD]]
    assert torch.equal(unpack_24(values, meta, (1, 8), torch.float32, "w"), W)


def test_known_answer_sparse_blocks_and_odd_block_count() -> None:
    W = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 0.0, 6.0, 0.0, 0.0, 0.0]])
    values, meta = pack_24(W, "w")
    # fewer than two nonzeros: the nonzero first, then the first zeros, kept in column order:
    # block 0 keeps (0, 1) -> 0x4, block 1 keeps (0, 2) -> 0x8, block 2 keeps (0, 1) -> 0x4; padding nibble 0
    assert values.tolist() == [[0.0, 0.0, 0.0, 5.0, 6.0, 0.0]]
    assert meta.tolist() == [[0x84, 0x04]]
    assert meta_columns(12) == 2
    assert torch.equal(unpack_24(values, meta, (1, 12), torch.float32, "w"), W)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(12, 40), (5, 12), (1, 4)])
def test_round_trip_is_bitwise_exact(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    W = random_24(*shape, dtype)  # W * mask: holds -0.0 where negative weights were masked
    W[0, :4] = torch.tensor([0.0, float("nan"), float("-inf"), 0.0])  # NaN and inf come back bit for bit
    values, meta = pack_24(W, "w")
    assert values.shape == (shape[0], shape[1] // 2) and values.dtype == dtype
    back = unpack_24(values, meta, shape, dtype, "w")
    nonzero = W != 0  # NaN included
    assert torch.equal(back.view(BITS[dtype])[nonzero], W.view(BITS[dtype])[nonzero])
    assert bool((back[~nonzero] == 0).all())
    canonical = torch.where(W == 0, torch.zeros_like(W), W)  # zeros as +0.0: exact bit for bit
    assert torch.equal(unpack_24(*pack_24(canonical, "w"), shape, dtype, "w").view(BITS[dtype]),
                       canonical.view(BITS[dtype]))


def test_negative_zero_not_stored_comes_back_as_positive_zero() -> None:
    W = torch.tensor([[-0.0, 0.0, 3.0, 0.0, -0.0, 1.0, 2.0, 0.0]])
    back = unpack_24(*pack_24(W, "w"), (1, 8), torch.float32, "w")
    assert torch.equal(back, W)  # equal in value
    assert torch.signbit(back[0, 0])  # stored (block 0 keeps positions 0 and 2): sign kept
    assert not torch.signbit(back[0, 4])  # block 1 keeps 1.0 and 2.0; its -0.0 comes back as +0.0


def test_rejects_non_24_naming_tensor_and_row() -> None:
    W = random_24(6, 16, torch.float32)
    W[3, 4:8] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    with pytest.raises(SurgeonError, match=r"^layer\.q\.weight: not 2:4 sparse: row 3 has 3 nonzeros in columns 4\.\.7"):
        check_24(W, "layer.q.weight")
    with pytest.raises(SurgeonError, match="1 of 6 rows fail"):
        pack_24(W, "layer.q.weight")
    with pytest.raises(SurgeonError, match="not a multiple of the 2:4 block size"):
        pack_24(torch.zeros(2, 6), "w")


def test_packed_size_is_at_most_057_of_dense_in_float16() -> None:
    for shape in [(1536, 576), (576, 1536), (11008, 4096)]:
        dense = shape[0] * shape[1] * 2
        assert packed_bytes(shape, torch.float16) / dense == 0.5 + 1 / 16 <= 0.57
    values, meta = pack_24(random_24(64, 96, torch.float16), "w")
    assert values.numel() * 2 + meta.numel() == packed_bytes((64, 96), torch.float16)


def test_unpack_rejects_inconsistent_parts() -> None:
    values, meta = pack_24(random_24(4, 16, torch.float16), "w")
    with pytest.raises(SurgeonError, match=r"^w: values have shape \[4, 8\], expected \[4, 16\]"):
        unpack_24(values, meta, (4, 32), torch.float16, "w")
    with pytest.raises(SurgeonError, match="values are torch.float16, metadata says torch.float32"):
        unpack_24(values, meta, (4, 16), torch.float32, "w")
    with pytest.raises(SurgeonError, match=r"2:4 metadata is torch.uint8 \[4, 2\], expected torch.uint8 \[4, 3\]"):
        unpack_24(torch.zeros(4, 12, dtype=torch.float16), meta, (4, 24), torch.float16, "w")
    bad = meta.clone()
    bad[2, 1] = 0x55  # positions 1, 1
    with pytest.raises(SurgeonError, match=r"^w: 2:4 metadata row 2, block 2 holds positions 1, 1"):
        unpack_24(values, bad, (4, 16), torch.float16, "w")
    odd_values, odd_meta = pack_24(random_24(3, 12, torch.float32), "w")
    odd_meta[1, 1] |= 0x40
    with pytest.raises(SurgeonError, match="row 1 has a nonzero padding nibble"):
        unpack_24(odd_values, odd_meta, (3, 12), torch.float32, "w")


HALF, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
DISPATCH_TABLE = [
    # capability, dtype, shape, cusparselt available, prefer -> kernel, kernel shape, words in the reason
    (None, HALF, (1536, 576), True, "auto", "dense", (1536, 576), "no CUDA device"),
    ((7, 5), HALF, (1536, 576), True, "auto", "dense", (1536, 576), "sm75: 2:4 sparse tensor cores need sm80"),
    ((8, 0), F32, (1536, 576), True, "auto", "dense", (1536, 576), "float32: 2:4 kernels take float16 or bfloat16"),
    ((8, 0), HALF, (1536, 576), True, "auto", "cusparselt", (1536, 576), "sm80 cusparselt"),
    ((8, 6), BF16, (576, 1536), False, "auto", "cutlass", (576, 1536), "sm86 cutlass"),
    ((9, 0), HALF, (11008, 4096), True, "auto", "cusparselt", (11008, 4096), "sm90 cusparselt"),
    ((9, 0), HALF, (1536, 576), False, "auto", "dense", (1536, 576), "CUTLASS needs sm8x"),
    ((9, 0), HALF, (1536, 576), True, "cutlass", "dense", (1536, 576), "built for sm8x only"),
    ((8, 0), HALF, (1536, 576), True, "cutlass", "cutlass", (1536, 576), "sm80 cutlass"),
    ((8, 0), HALF, (1536, 576), False, "cusparselt", "dense", (1536, 576), "cuSPARSELt is not available"),
    ((8, 0), HALF, (200, 576), True, "auto", "cusparselt", (208, 576), "padded from [200, 576] to [208, 576]"),
    ((8, 0), HALF, (200, 576), False, "auto", "cutlass", (224, 576), "padded from [200, 576] to [224, 576]"),
    ((8, 0), HALF, (8, 16), True, "auto", "dense", (8, 16), "would need padding to [16, 16]"),
    ((8, 0), HALF, (64, 96), False, "auto", "dense", (64, 96), "+33%, more than 25%"),
]


@pytest.mark.parametrize("cap, dtype, shape, cslt, prefer, kernel, kshape, reason", DISPATCH_TABLE)
def test_dispatch_table(cap: tuple[int, int] | None, dtype: torch.dtype, shape: tuple[int, int], cslt: bool,
                        prefer: str, kernel: str, kshape: tuple[int, int], reason: str) -> None:
    d = choose_backend(cap, dtype, shape, cusparselt=cslt, prefer=prefer)  # type: ignore[arg-type]
    assert (d.kernel, d.shape) == (kernel, kshape)
    assert reason in d.reason


def test_dispatch_multiples_match_installed_torch() -> None:
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT as Cslt
    from torch.sparse import SparseSemiStructuredTensorCUTLASS as Cutlass

    for name, cls in (("cusparselt", Cslt), ("cutlass", Cutlass)):
        for dtype in (HALF, BF16):
            c = cls._DTYPE_SHAPE_CONSTRAINTS[dtype]
            assert MULTIPLE[name] == (c.sparse_min_rows, c.sparse_min_cols)


def test_padded_linear_matches_the_original_on_cpu() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(20, 10, bias=True)
    padded = SemiStructuredLinear(pad_weight(linear.weight.detach(), (16, 32)), linear.bias.detach(), 20, 10)
    x = torch.randn(2, 3, 20)
    torch.testing.assert_close(padded(x), linear(x))
    assert padded(x).shape == (2, 3, 10)


def test_switching_linear_runs_the_dense_copy_below_its_token_count() -> None:
    torch.manual_seed(0)
    W, b = torch.randn(10, 20), torch.randn(10)
    # the "sparse" weight is 2W (padded) so that the path taken shows in the result
    module = SemiStructuredLinear(pad_weight(2 * W, (16, 32)), b, 20, 10, dense=W, dense_below=8)
    for shape, factor in [((1, 1, 20), 1), ((2, 3, 20), 1), ((7, 20), 1), ((8, 20), 2), ((2, 4, 20), 2), ((3, 64, 20), 2)]:
        x = torch.randn(shape)
        torch.testing.assert_close(module(x), x @ (factor * W).T + b)


def test_winning_tail_and_switch_point() -> None:
    assert winning_tail({}) is None
    assert winning_tail({0.5: True, 0.9: False}) is None  # the largest loses
    assert winning_tail({0.5: True, 0.9: True}) == 0.5
    assert winning_tail({1: True, 8: False, 32: True, 128: True}) == 32  # a win below a loss does not count
    times = {1: (2.0, 1.0), 8: (1.0, 1.0), 32: (0.98, 1.0), 128: (0.96, 1.0), 2048: (0.6, 1.0)}
    assert switch_point(times) == 128  # 2% faster at 32 is within the 3% margin
    assert switch_point(times, min_gain=0.0) == 32
    assert switch_point({1: (0.5, 1.0), 2048: (0.5, 1.0)}) == 1
    assert switch_point({1: (0.5, 1.0), 2048: (1.0, 1.0)}) is None


def test_tuned_decisions_name_the_measurement() -> None:
    d = choose_backend((9, 0), HALF, (200, 576))  # padded to (208, 576)
    never = tuned(d, (200, 576), {1: (2.0, 1.0), 2048: (1.0, 1.0)})
    assert (never.kernel, never.shape, never.dense_below) == ("dense", (200, 576), 0)
    assert "not faster than dense at 2048 tokens" in never.reason and "1: 2.00, 2048: 1.00" in never.reason
    always = tuned(d, (200, 576), {1: (0.5, 1.0), 2048: (0.5, 1.0)})
    assert (always.kernel, always.shape, always.dense_below) == ("cusparselt", (208, 576), 0)
    switched = tuned(d, (200, 576), {1: (2.0, 1.0), 128: (0.8, 1.0), 2048: (0.5, 1.0)})
    assert (switched.kernel, switched.shape, switched.dense_below) == ("cusparselt", (208, 576), 128)
    assert "from 128 tokens; dense below" in switched.reason


def test_auto_policy_places_layers_by_measured_speed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """The load-time wiring of the auto policy, on CPU: a fake sm90 device whose "2:4 conversion" keeps
    the dense tensor and whose timings are given per shape (MLP: faster from 32 tokens; the square
    attention projections: always; k/v: never)."""
    import runtime.load as load

    model, src = pruned_24_dir(tmp_path)
    pack_checkpoint(load_model(src), tmp_path / "packed", PackConfig("2:4"))
    linears = LLAMA.decoder_linears(model)
    mlp = {tuple(linears[n].weight.shape) for n in linears if ".mlp." in n}
    square = {tuple(linears[n].weight.shape) for n in linears if n.endswith("q_proj")}
    assert not mlp & square
    tuned_shapes: list[tuple[int, int]] = []

    def fake_tune(decision: Dispatch, shape: tuple[int, int], *args: object) -> dict[int, tuple[float, float]]:
        tuned_shapes.append(shape)
        if shape in mlp:
            return {m: (0.5 if m >= 32 else 2.0, 1.0) for m in PROBE_TOKENS}
        return {m: (0.5 if shape in square else 1.5, 1.0) for m in PROBE_TOKENS}

    monkeypatch.setattr(load, "device_dispatch", lambda device, dtype, shape, prefer: Dispatch("cusparselt", "sm90 cusparselt", shape))
    monkeypatch.setattr(load, "tune", fake_tune)
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", lambda W: W.clone())
    with caplog.at_level(logging.WARNING, logger="runtime.load"):
        cm = load_compressed(tmp_path / "packed")
    assert sorted(tuned_shapes) == sorted({tuple(l.weight.shape) for l in linears.values()})  # once per shape
    for name, linear in linears.items():
        d, module = cm.placements[f"{name}.weight"], cm.lm.model.get_submodule(name)
        shape = tuple(linear.weight.shape)
        if shape in mlp:
            assert (d.kernel, d.dense_below) == ("cusparselt", 32) and isinstance(module, SemiStructuredLinear)
            assert module.dense is not None and module.dense_below == 32
        elif shape in square:
            assert (d.kernel, d.dense_below) == ("cusparselt", 0) and type(module) is nn.Linear
        else:
            assert d.kernel == "dense" and "not faster than dense" in d.reason and type(module) is nn.Linear
    assert set(cm.dense_below()) == {f"{n}.weight" for n in linears if ".mlp." in n}
    assert cm.describe()["dense_below"] == cm.dense_below()
    messages = [r.getMessage() for r in caplog.records]
    assert any("keep a dense copy for calls under 32 tokens" in m for m in messages), messages
    with torch.no_grad():
        for ids in (IDS, IDS[:, :1]):
            torch.testing.assert_close(cm.lm.model(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    sparse = load_compressed(tmp_path / "packed", policy="sparse")
    assert sparse.kernels() == {"cusparselt": 14} and sparse.dense_below() == {}


def test_force_cutlass_restores_the_flag() -> None:
    from torch.sparse import SparseSemiStructuredTensor

    before = SparseSemiStructuredTensor._FORCE_CUTLASS
    with pytest.raises(RuntimeError), force_cutlass(not before):
        assert SparseSemiStructuredTensor._FORCE_CUTLASS is (not before)
        raise RuntimeError("conversion failed")
    assert SparseSemiStructuredTensor._FORCE_CUTLASS is before


@pytest.mark.parametrize("dtype", [None, "float16"])
def test_packed_tiny_llama_loads_with_identical_logits_on_cpu(
    tmp_path: Path, dtype: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    model, src = pruned_24_dir(tmp_path)
    manifest = pack_checkpoint(load_model(src), tmp_path / "packed", PackConfig("2:4", dtype))
    assert manifest["packed_tensors"] == 14 and manifest["decoder_linear"]["sparsity"] >= 0.5
    ratio = manifest["bytes"]["decoder_linear_ratio"]
    assert ratio == (0.5625 if dtype == "float16" else 0.53125)
    with caplog.at_level(logging.WARNING, logger="runtime.load"):
        cm = load_compressed(tmp_path / "packed")
    assert [r.getMessage() for r in caplog.records] == [
        "2:4 weights loaded dense on cpu: semi-structured kernels need a CUDA sm80+ GPU"]
    assert cm.kernels() == {"dense": 14} and cm.fallbacks() == {}
    reference = model.to(torch.float16) if dtype == "float16" else model
    with torch.no_grad():
        assert torch.equal(cm.lm.model(IDS).logits, reference(IDS).logits)
    described = cm.describe()
    assert described["format"] == "2:4" and described["sparsity"] >= 0.5
    assert described["dtype"] == (dtype or "float32")


def test_pack_refuses_a_model_that_is_not_24(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SurgeonError, match=r"^model\.layers\.0\.self_attn\.q_proj\.weight: not 2:4 sparse: row 0 .*"
                                           r"\(14 of 14 decoder linears are not 2:4\)$"):
        pack_checkpoint(load_model(tiny_llama_dir), tmp_path / "packed", PackConfig("2:4"))
    assert not (tmp_path / "packed").exists()


@pytest.mark.parametrize("dtype", [HALF, BF16])
@pytest.mark.parametrize("kernel", ["cusparselt", "cutlass"])
@pytest.mark.parametrize("shape", [(128, 256), (200, 576)])
@pytest.mark.gpu
@needs_sm80
def test_gpu_semi_structured_linear_matches_dense(dtype: torch.dtype, kernel: str, shape: tuple[int, int]) -> None:
    cap = torch.cuda.get_device_capability()
    d = choose_backend(cap, dtype, shape, cusparselt=torch.backends.cusparselt.is_available(), prefer=kernel)  # type: ignore[arg-type]
    if d.kernel == "dense":
        pytest.skip(d.reason)
    W = random_24(*shape, dtype).cuda()
    linear = nn.Linear(shape[1], shape[0], bias=False, device="cuda", dtype=dtype)
    linear.weight = nn.Parameter(W.clone(), requires_grad=False)
    module = to_semi_structured_linear(linear, d)
    x = torch.randn(3, 17, shape[1], device="cuda", dtype=dtype)
    assert isinstance(module, SemiStructuredLinear) == (d.shape != shape)
    torch.testing.assert_close(module(x), x @ W.T, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@needs_sm80
def test_gpu_packed_tiny_llama_runs_on_24_kernels(tmp_path: Path) -> None:
    model, src = pruned_24_dir(tmp_path)
    pack_checkpoint(load_model(src), tmp_path / "packed", PackConfig("2:4", "float16"))
    cm = load_compressed(tmp_path / "packed", device="cuda", policy="sparse")
    assert set(cm.kernels()) - {"dense"}, cm.placements
    cap, available = torch.cuda.get_device_capability(), torch.backends.cusparselt.is_available()
    for key, d in cm.placements.items():  # each placement against the dispatch rules, computed apart
        shape = tuple(model.get_submodule(key.removesuffix(".weight")).weight.shape)
        expected = choose_backend(cap, torch.float16, shape, cusparselt=available)  # type: ignore[arg-type]
        if expected.kernel == "dense":
            assert (d.kernel, d.reason) == ("dense", expected.reason), key
        else:  # the rules allow a kernel: it runs, or the kernel itself refused the conversion
            assert d.kernel == expected.kernel or d.reason.startswith("conversion failed"), (key, d)
    assert cm.fallbacks() == {k: d.reason for k, d in cm.placements.items() if d.kernel == "dense"}
    ids = IDS.cuda()
    with torch.no_grad():
        dense = model.to("cuda", torch.float16)(ids).logits.float()
        torch.testing.assert_close(cm.lm.model(ids).logits.float(), dense, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@needs_sm80
def test_gpu_auto_policy_measures_and_keeps_the_logits(tmp_path: Path) -> None:
    model, src = pruned_24_dir(tmp_path, hidden_size=256, intermediate_size=1024)
    pack_checkpoint(load_model(src), tmp_path / "packed", PackConfig("2:4", "float16"))
    cm = load_compressed(tmp_path / "packed", device="cuda")  # policy auto: timed on this GPU
    for d in cm.placements.values():
        assert d.kernel != "dense" or "not faster than dense" in d.reason or d.reason in cm.fallbacks().values()
        assert "2:4/dense" in d.reason or "faster than dense" in d.reason or "dense below" in d.reason or d.kernel == "dense"
    ids = IDS.cuda()
    with torch.no_grad():
        reference = model.to("cuda", torch.float16)
        for x in (ids, ids[:, :1]):
            torch.testing.assert_close(cm.lm.model(x).logits.float(), reference(x).logits.float(), rtol=2e-2, atol=2e-2)


def test_dispatch_is_a_plain_value() -> None:
    d = choose_backend((8, 0), HALF, (32, 64))
    assert d == Dispatch("cusparselt", "sm80 cusparselt", (32, 64))
    assert d.to_dict() == {"kernel": "cusparselt", "reason": "sm80 cusparselt", "shape": [32, 64], "dense_below": 0}


# ---- other N:M patterns: values plus a one-bit-per-weight mask ----

def test_nm_known_answers() -> None:
    W = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 0.0, 4.0]])
    values, mask = pack_nm(W, NMPattern(4, 8), "w")
    assert values.tolist() == [[1.0, 2.0, 3.0, 4.0]] and mask.tolist() == [[0x9A]]  # columns 1, 3, 4, 7
    # 1:4 over 12 columns: a block of zeros stores its lowest position; 12 bits need 2 bytes, the rest 0
    W = torch.tensor([[0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -6.0]])
    values, mask = pack_nm(W, NMPattern(3, 4), "w")
    assert values.tolist() == [[5.0, 0.0, -6.0]] and mask.tolist() == [[0x14, 0x08]]  # columns 2, 4, 11
    assert torch.equal(unpack_nm(values, mask, (1, 12), torch.float32, NMPattern(3, 4), "w"), W)


@pytest.mark.parametrize("text", ["1:4", "3:4", "2:8", "4:8", "1:2", "8:16", "2:4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nm_round_trip_is_exact_and_stores_the_nonzeros(text: str, dtype: torch.dtype) -> None:
    pattern = NMPattern.parse(text)
    W = random_24(24, 48, dtype, seed=3, pattern=pattern)
    W = torch.where(W == 0, torch.zeros_like(W), W)  # zeros as +0.0 (a -0.0 not stored comes back +0.0, as for 2:4)
    W[:2, : pattern.block] = 0
    W[0, 1], W[1, 0] = float("nan"), float("-inf")  # NaN and inf come back bit for bit
    values, mask = pack_nm(W, pattern, "w")
    kept = pattern.block - pattern.n_zero
    assert values.shape == (24, 48 // pattern.block * kept) and mask.shape == (24, mask_columns(48))
    back = unpack_nm(values, mask, (24, 48), dtype, pattern, "w")
    assert back.view(BITS[dtype]).equal(W.view(BITS[dtype]))  # bit for bit
    # brute force: every nonzero is stored, and each block stores exactly `kept` positions
    bits = torch.tensor([[(int(mask[r, j // 8]) >> (j % 8)) & 1 for j in range(48)] for r in range(24)], dtype=torch.bool)
    assert bool(bits[W != 0].all()) and bool((bits.reshape(24, -1, pattern.block).sum(-1) == kept).all())
    assert values.numel() * values.element_size() + mask.numel() == nm_bytes((24, 48), dtype, pattern)


def test_nm_sizes_in_float16() -> None:
    shape = (1536, 576)
    dense = shape[0] * shape[1] * 2
    assert nm_bytes(shape, torch.float16, NMPattern(4, 8)) / dense == 0.5625
    assert nm_bytes(shape, torch.float16, NMPattern(3, 4)) / dense == 0.3125  # 1:4
    assert nm_bytes(shape, torch.float16, NMPattern()) == packed_bytes(shape, torch.float16)  # same size as 2:4's nibbles


def test_nm_rejects_a_weight_without_the_pattern_and_tampered_parts() -> None:
    pattern = NMPattern(4, 8)
    W = random_24(4, 16, torch.float32, pattern=pattern)
    W[2, 9:14] = 1.0  # 5 nonzeros in columns 8..15 (block 1 of row 2)
    with pytest.raises(SurgeonError, match=r"^w: not 4:8 sparse: row 2 has \d nonzeros in columns 8\.\.15 "
                                           r"\(every 8 consecutive inputs need at least 4 zeros\); 1 of 4 rows fail$"):
        pack_nm(W, pattern, "w")
    with pytest.raises(SurgeonError, match="12 input columns are not a multiple of the 4:8 block size 8"):
        pack_nm(torch.zeros(2, 12), pattern, "w")
    values, mask = pack_nm(random_24(4, 12, torch.float32, pattern=NMPattern(3, 4)), NMPattern(3, 4), "w")
    cases = [
        (values, mask | torch.tensor([0, 0x10], dtype=torch.uint8), "mask row 0 has a bit set past column 11"),
        (values, mask ^ torch.tensor([1, 0], dtype=torch.uint8) * (mask[:, :1] & 1 == 0), "row 0, block 0 marks 2 stored"),
        (values[:, :2], mask, r"values have shape \[4, 2\], expected \[4, 3\]"),
        (values.half(), mask, "values are torch.float16, metadata says torch.float32"),
        (values, mask.to(torch.int16), "mask is torch.int16"),
    ]
    for v, m, message in cases:
        with pytest.raises(SurgeonError, match=message):
            unpack_nm(v, m, (4, 12), torch.float32, NMPattern(3, 4), "w")


def test_48_checkpoint_packs_loads_and_densifies(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from export.sparse_checkpoint import densify

    pattern = NMPattern(4, 8)
    model, src = pruned_24_dir(tmp_path, pattern)
    with pytest.raises(SurgeonError, match=r"not 2:4 sparse: .*decoder linears are not 2:4\)$"):
        pack_checkpoint(load_model(src), tmp_path / "as24", PackConfig("2:4"))  # 4:8 is not 2:4
    manifest = pack_checkpoint(load_model(src), tmp_path / "packed", PackConfig("4:8"))
    assert manifest["layout"] == "4:8" and manifest["bytes"]["decoder_linear_ratio"] == 0.53125  # float32: 1/2 + 1/32
    cm = load_compressed(tmp_path / "packed")
    with torch.no_grad():
        assert torch.equal(cm.lm.model(IDS).logits, model(IDS).logits)
    from runtime.backend import load_backend

    assert load_backend("torch-24", tmp_path / "packed").describe()["format"] == "4:8"
    with pytest.raises(SurgeonError, match="holds 4:8 weights; this backend reads csr or bsr"):
        load_backend("torch-csr", tmp_path / "packed")
    densify(tmp_path / "packed", tmp_path / "dense")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", local_files_only=True)
    for name, linear in LLAMA.decoder_linears(model).items():
        assert torch.equal(plain.get_submodule(name).weight, linear.weight)


def test_nm_layers_take_24_kernels_only_where_they_are_also_24(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake sm90 device (sparse policy, no timing): a 1:4 pack is 2:4 everywhere; a 4:8 pack of
    random weights is 2:4 nowhere, and its layers stay dense with the reason."""
    import runtime.load as load

    monkeypatch.setattr(load, "device_dispatch", lambda device, dtype, shape, prefer: Dispatch("cusparselt", "sm90 cusparselt", shape))
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", lambda W: W.clone())
    for text, kernels in (("1:4", {"cusparselt": 14}), ("4:8", {"dense": 14})):
        pattern = NMPattern.parse(text)
        _, src = pruned_24_dir(tmp_path, pattern)
        pack_checkpoint(load_model(src), tmp_path / f"packed{text}", PackConfig(text))
        cm = load_compressed(tmp_path / f"packed{text}", policy="sparse")
        assert cm.kernels() == kernels
        if text == "4:8":
            assert all("4:8 weight is not also 2:4" in d.reason for d in cm.placements.values())
