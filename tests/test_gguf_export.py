"""GGUF export for llama.cpp (export/gguf.py), checked by reading the files back with ``gguf.GGUFReader``.

Tiny models only. Tensors are compared exactly with the source safetensors (F32), with the source cast
to the target dtype (F16, BF16), or within Q8_0's block error; the Q/K row order is undone here with an
independent inverse and checked against the RoPE llama.cpp applies (interleaved pairs).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf  # a hard dependency: never skipped
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from base.adapters import get_adapter
from base.errors import SurgeonError
from base.surgery import LayerPlan, RemovalPlan
from export.gguf import export_gguf
from export.pruned import ShrinkConfig, shrink_and_save
from tests.cli_runner import run_cli
from tests.conftest import make_tokenizer, tiny_llama_config
from tests.test_surgery import make_model

CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
# GGUF name pattern -> Hugging Face name pattern, written out here rather than taken from gguf's map.
HF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Per layer: (MLP width, heads, KV heads) after the plan below, from 40 / 6 / 2 (head_dim 8, hidden 48).
PER_LAYER_PLAN = RemovalPlan({0: LayerPlan.of(channels=range(5)), 1: LayerPlan.of(channels=range(9), kv_groups=[1]),
                              2: LayerPlan.of(heads=[0, 3])})
PER_LAYER_SIZES = [(35, 6, 2), (31, 3, 1), (40, 4, 2)]


DERIVED = ("rope_freqs.weight",)  # computed from the config (Llama 3 RoPE scaling), not a stored tensor


def stored(tensors: dict) -> dict:
    """The GGUF tensors that come from the checkpoint's own (``rope_freqs`` aside: test_rope_scaling)."""
    return {n: t for n, t in tensors.items() if n not in DERIVED}


def hf_name(gguf_name: str) -> str:
    if gguf_name in HF_NAMES:
        return HF_NAMES[gguf_name]
    _, layer, rest = gguf_name.split(".", 2)
    return f"model.layers.{layer}.{HF_NAMES[rest]}"


def unpermute(rows: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's Q/K row order back to Hugging Face's: per head, interleaved pairs -> two halves."""
    half = rows.shape[0] // n_heads // 2
    return rows.reshape(n_heads, half, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def read(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return meta, {t.name: t for t in reader.tensors}


def values(t) -> torch.Tensor:
    """A GGUF tensor as float32 in numpy (row-major) order; F16 exactly, others dequantised."""
    data = np.asarray(t.data)
    if t.tensor_type == gguf.GGMLQuantizationType.F32:
        return torch.from_numpy(data.copy())
    if t.tensor_type == gguf.GGMLQuantizationType.F16:
        return torch.from_numpy(data.astype(np.float32))
    return torch.from_numpy(gguf.quants.dequantize(data, t.tensor_type).copy())


def source_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def head_counts(meta: dict, arch: str, layer: int) -> tuple[int, int]:
    heads, kv = meta[f"{arch}.attention.head_count"], meta[f"{arch}.attention.head_count_kv"]
    return (heads[layer], kv[layer]) if isinstance(heads, list) else (heads, kv)


def as_source_order(name: str, x: torch.Tensor, meta: dict) -> torch.Tensor:
    """Undo the Q/K permutation of llama-style architectures (not of qwen2/qwen3, which use NEOX RoPE)."""
    arch = meta["general.architecture"]
    if arch not in ("llama", "deci") or not name.startswith("blk."):
        return x
    heads, kv = head_counts(meta, arch, int(name.split(".")[1]))
    if ".attn_q." in name:
        return unpermute(x, heads)
    if ".attn_k." in name:
        return unpermute(x, kv)
    return x


@pytest.fixture(scope="module")
def tok():
    tokenizer = make_tokenizer(vocab_size=320)  # 258 bytes and specials, then real merges
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save(model, tokenizer, directory: Path) -> Path:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def qwen_tok():
    """transformers loads a qwen2/qwen3 directory's tokenizer as Qwen2Tokenizer, which needs <|endoftext|>."""
    tokenizer = make_tokenizer(vocab_size=320)
    tokenizer.add_tokens(["<|endoftext|>"], special_tokens=True)
    return tokenizer


@pytest.fixture(scope="module")
def llama_dir(tok, tmp_path_factory) -> Path:
    """2 layers, hidden 32, 4 heads over 2 KV heads, head_dim 8, MLP 64, tied embeddings."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tok), rope_theta=5000.0, rms_norm_eps=1e-5)).eval()
    return save(model, tok, tmp_path_factory.mktemp("gguf") / "tiny-llama")


def per_layer(family: str, tok, root: Path, plan: RemovalPlan, **overrides) -> Path:
    model = make_model(family, dtype=torch.float32, vocab_size=len(tok), **overrides)
    out = root / f"{family}-per-layer"
    shrink_and_save(model, tok, get_adapter(family), out, ShrinkConfig(check_tokens=0), plan=plan)
    return out


@pytest.fixture(scope="module")
def per_layer_dir(tok, tmp_path_factory) -> Path:
    return per_layer("llama", tok, tmp_path_factory.mktemp("gguf"), PER_LAYER_PLAN)


def padded(name: str, src: torch.Tensor, meta: dict) -> torch.Tensor:
    """The source tensor with the zero MLP channels the writer appends to reach a multiple of 32."""
    kind = name.split(".")[-2] if name.startswith("blk.") else ""
    if kind not in ("ffn_gate", "ffn_up", "ffn_down") or not name.endswith(".weight"):
        return src
    arch, layer = meta["general.architecture"], int(name.split(".")[1])
    width = meta[f"{arch}.feed_forward_length"]
    width = width[layer] if isinstance(width, list) else width
    assert width % 32 == 0 and width - 32 < (src.shape[1] if kind == "ffn_down" else src.shape[0]) <= width
    if kind == "ffn_down":
        return torch.cat([src, src.new_zeros(src.shape[0], width - src.shape[1])], dim=1)
    return torch.cat([src, src.new_zeros(width - src.shape[0], src.shape[1])])


def check_f32_round_trip(directory: Path, out: Path) -> tuple[dict, dict, dict]:
    manifest = export_gguf(directory, out, tensor_type="f32")
    meta, tensors = read(out)
    source = source_tensors(directory)
    tied = json.loads((directory / "config.json").read_text()).get("tie_word_embeddings")
    expected = {k for k in source if not (tied and k == "lm_head.weight")}
    assert {hf_name(n) for n in stored(tensors)} == expected
    for name, t in stored(tensors).items():
        src = padded(name, source[hf_name(name)], meta)
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
        assert list(t.shape) == list(reversed(src.shape)), name  # ggml order: fastest dimension first
        assert tuple(t.data.shape) == tuple(src.shape), name
        assert torch.equal(as_source_order(name, values(t), meta), src), name
    assert manifest["tensor_count"] == len(tensors) and manifest["bytes"] == out.stat().st_size
    return manifest, meta, tensors


def test_f32_round_trip_uniform_llama(llama_dir: Path, tmp_path: Path) -> None:
    manifest, meta, tensors = check_f32_round_trip(llama_dir, tmp_path / "m.gguf")
    config = json.loads((llama_dir / "config.json").read_text())
    assert meta["general.architecture"] == "llama" and manifest["architecture"] == "llama"
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert meta["llama.block_count"] == 2 and meta["llama.embedding_length"] == 32
    assert meta["llama.feed_forward_length"] == 64
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) == (4, 2)
    assert meta["llama.attention.key_length"] == meta["llama.attention.value_length"] == 8
    assert meta["llama.rope.dimension_count"] == 8
    assert meta["llama.rope.freq_base"] == config["rope_parameters"]["rope_theta"] == 5000.0
    assert meta["llama.attention.layer_norm_rms_epsilon"] == np.float32(1e-5)
    assert meta["llama.context_length"] == 128 and meta["llama.vocab_size"] == 320
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (0, 1)
    assert meta["general.file_type"] == 0 and manifest["per_layer_shapes"] is False


def test_f32_round_trip_per_layer_shapes_use_deci(per_layer_dir: Path, tmp_path: Path) -> None:
    config = json.loads((per_layer_dir / "config.json").read_text())
    assert config["model_type"] == "surgeon_llama"
    assert list(zip(config["layer_intermediate_sizes"], config["layer_num_attention_heads"],
                    config["layer_num_key_value_heads"])) == PER_LAYER_SIZES
    manifest, meta, tensors = check_f32_round_trip(per_layer_dir, tmp_path / "p.gguf")
    assert meta["general.architecture"] == "deci" and manifest["per_layer_shapes"] is True
    assert meta["deci.block_count"] == 3 and meta["deci.embedding_length"] == 48
    assert meta["deci.feed_forward_length"] == [64, 32, 64]  # 35, 31, 40 padded with zero channels
    assert meta["surgeon.feed_forward_length"] == [s[0] for s in PER_LAYER_SIZES]
    assert manifest["feed_forward_length_written"] == [64, 32, 64]
    assert meta["deci.attention.head_count"] == [s[1] for s in PER_LAYER_SIZES]
    assert meta["deci.attention.head_count_kv"] == [s[2] for s in PER_LAYER_SIZES]
    assert meta["deci.attention.key_length"] == meta["deci.attention.value_length"] == 8
    assert meta["deci.rope.dimension_count"] == 8
    assert meta["deci.rope.freq_base"] == config["rope_parameters"]["rope_theta"]
    assert meta["deci.attention.layer_norm_rms_epsilon"] == np.float32(config["rms_norm_eps"])
    assert meta["deci.context_length"] == 64 and meta["deci.vocab_size"] == 320
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (0, 1)
    for i, (ff, heads, kv) in enumerate(PER_LAYER_SIZES):  # each layer has its own shapes in the file
        assert list(tensors[f"blk.{i}.attn_q.weight"].shape) == [48, heads * 8]
        assert list(tensors[f"blk.{i}.attn_k.weight"].shape) == [48, kv * 8]
        assert list(tensors[f"blk.{i}.ffn_down.weight"].shape) == [-(-ff // 32) * 32, 48]
    assert [layer["intermediate_size"] for layer in manifest["layers"]] == [35, 31, 40]


def test_qk_rows_match_llama_cpp_rope(llama_dir: Path, tmp_path: Path) -> None:
    """Attention logits are the same with Hugging Face's RoPE on the source rows and ggml's NORM RoPE
    (consecutive pairs) on the written rows: the permutation is the one llama.cpp needs."""
    export_gguf(llama_dir, tmp_path / "m.gguf", tensor_type="f32")
    meta, tensors = read(tmp_path / "m.gguf")
    source = source_tensors(llama_dir)
    hd, base, heads, kv = 8, meta["llama.rope.freq_base"], 4, 2
    inv_freq = base ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)

    def rope_hf(x: torch.Tensor, pos: int) -> torch.Tensor:  # transformers: rotate_half, halves paired
        angle = torch.cat([pos * inv_freq, pos * inv_freq])
        rotated = torch.cat([-x[..., hd // 2:], x[..., : hd // 2]], dim=-1)
        return x * angle.cos() + rotated * angle.sin()

    def rope_norm(x: torch.Tensor, pos: int) -> torch.Tensor:  # ggml LLAMA_ROPE_TYPE_NORM: (x[2i], x[2i+1])
        a, b = x[..., 0::2], x[..., 1::2]
        c, s = (pos * inv_freq).cos(), (pos * inv_freq).sin()
        return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)

    torch.manual_seed(1)
    x_q, x_k = torch.randn(32, dtype=torch.float64), torch.randn(32, dtype=torch.float64)
    for layer in range(2):
        wq, wk = (source[f"model.layers.{layer}.self_attn.{p}_proj.weight"].double() for p in "qk")
        gq, gk = (values(tensors[f"blk.{layer}.attn_{p}.weight"]).double() for p in "qk")
        assert not torch.equal(gq, wq)  # the rows were reordered
        for pq, pk in ((0, 0), (5, 2), (17, 11)):
            hf = rope_hf((wq @ x_q).view(heads, hd), pq) @ rope_hf((wk @ x_k).view(kv, hd), pk).T
            cpp = rope_norm((gq @ x_q).view(heads, hd), pq) @ rope_norm((gk @ x_k).view(kv, hd), pk).T
            torch.testing.assert_close(cpp, hf, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind, dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_f16_and_bf16_equal_the_source_cast(kind: str, dtype: torch.dtype, per_layer_dir: Path, tmp_path: Path) -> None:
    manifest = export_gguf(per_layer_dir, tmp_path / "h.gguf", tensor_type=kind)
    meta, tensors = read(tmp_path / "h.gguf")
    source = source_tensors(per_layer_dir)
    target = gguf.GGMLQuantizationType[kind.upper()]
    assert manifest["tensor_type"] == kind.upper() and meta["general.file_type"] == int(manifest["file_type"])
    assert meta["general.file_type"] == {"f16": 1, "bf16": 32}[kind]
    for name, t in stored(tensors).items():
        src = padded(name, source[hf_name(name)], meta)
        if src.dim() == 1:  # norms stay float32, as llama.cpp's converter keeps them
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and torch.equal(values(t), src), name
            continue
        assert t.tensor_type == target, name
        got = as_source_order(name, values(t).reshape(src.shape), meta)
        assert torch.equal(got, src.to(dtype).float()), name


def test_q8_0_within_block_error(llama_dir: Path, per_layer_dir: Path, tmp_path: Path) -> None:
    manifest = export_gguf(llama_dir, tmp_path / "q.gguf", tensor_type="q8_0")
    meta, tensors = read(tmp_path / "q.gguf")
    source = source_tensors(llama_dir)
    assert meta["general.file_type"] == 7 and manifest["f16_fallback"] == []
    inexact = 0
    for name, t in stored(tensors).items():
        src = source[hf_name(name)]
        if src.dim() == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            continue
        assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0, name
        got = as_source_order(name, values(t).reshape(src.shape), meta)
        err = (got - src).reshape(-1, 32).abs()  # Q8_0: 32 values share one scale, max |x| / 127
        bound = src.reshape(-1, 32).abs().amax(dim=1, keepdim=True) / 127
        assert bool((err <= bound).all()), name
        inexact += int((err > 0).sum())
    assert inexact > 0  # really quantised
    # Rows that are not whole Q8_0 blocks (hidden 48) are written F16, as convert_hf_to_gguf does; the MLP
    # widths 35/31/40 are padded to 64/32/64, so ffn_down is Q8_0.
    manifest = export_gguf(per_layer_dir, tmp_path / "pq.gguf", tensor_type="q8_0")
    meta, tensors = read(tmp_path / "pq.gguf")
    source = {n: padded(n, source_tensors(per_layer_dir)[hf_name(n)], meta) for n in stored(tensors)}
    odd = sorted(n for n in source if source[n].dim() == 2 and source[n].shape[-1] % 32)
    assert sorted(manifest["f16_fallback"]) == odd and "blk.2.attn_output.weight" not in odd  # 4 heads x 8 = 32
    assert not any(".ffn_down." in n for n in odd)
    for name in odd:
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.F16
        assert torch.equal(as_source_order(name, values(tensors[name]), meta), source[name].half().float())
    assert tensors["blk.2.attn_output.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0


def test_tokenizer_metadata(tok, llama_dir: Path, tmp_path: Path) -> None:
    export_gguf(llama_dir, tmp_path / "t.gguf", tensor_type="f16")
    meta, _ = read(tmp_path / "t.gguf")
    vocab = tok.get_vocab()
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.tokens"] == [tok.convert_ids_to_tokens(i) for i in range(len(vocab))]
    assert meta["tokenizer.ggml.tokens"][:2] == ["<s>", "</s>"] and len(meta["tokenizer.ggml.tokens"]) == 320
    assert meta["tokenizer.ggml.token_type"] == [3, 3] + [1] * 318  # CONTROL for the specials, NORMAL else
    merges = json.loads((llama_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert len(merges) > 20 and meta["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]
    special_ids = (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"])
    assert special_ids == (tok.bos_token_id, tok.eos_token_id)
    assert tok("abc")["input_ids"][0] != tok.bos_token_id
    assert meta["tokenizer.ggml.add_bos_token"] is False and meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.chat_template"] == CHAT_TEMPLATE


def test_add_bos_follows_what_transformers_does(tmp_path: Path) -> None:
    from tokenizers import processors
    from transformers import LlamaForCausalLM

    tokenizer = make_tokenizer(vocab_size=320)
    bos_first = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer.backend_tokenizer.post_processor = bos_first
    assert tokenizer("abc")["input_ids"][0] == 0
    torch.manual_seed(0)
    directory = save(LlamaForCausalLM(tiny_llama_config(len(tokenizer))), tokenizer, tmp_path / "bos")
    export_gguf(directory, tmp_path / "b.gguf")
    meta, _ = read(tmp_path / "b.gguf")
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_eos_token"] is False


def test_rope_scaling(tok, tmp_path: Path) -> None:
    """Llama 3 RoPE: ``rope_freqs`` divides each frequency as transformers' llama3 rule does; linear: a factor."""
    from transformers import LlamaForCausalLM
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    llama3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    config = tiny_llama_config(len(tok), rope_parameters=llama3)
    directory = save(LlamaForCausalLM(config), tok, tmp_path / "llama3")
    export_gguf(directory, tmp_path / "r.gguf", tensor_type="f32")
    meta, tensors = read(tmp_path / "r.gguf")
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    factors = values(tensors["rope_freqs.weight"]).double()
    assert factors.shape == (4,) and factors[1:].tolist() == [8.0, 8.0, 8.0] and 1 < factors[0] < 8
    torch.testing.assert_close(factors, plain / scaled.double(), rtol=1e-6, atol=0)
    linear = tiny_llama_config(len(tok), rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})
    export_gguf(save(LlamaForCausalLM(linear), tok, tmp_path / "linear"), tmp_path / "l.gguf", tensor_type="f32")
    meta, tensors = read(tmp_path / "l.gguf")
    assert (meta["llama.rope.scaling.type"], meta["llama.rope.scaling.factor"]) == ("linear", 2.0)
    assert "rope_freqs.weight" not in tensors


def test_untied_mistral_writes_the_lm_head(tok, tmp_path: Path) -> None:
    model = make_model("mistral", dtype=torch.float32, vocab_size=len(tok), tie_word_embeddings=False)
    directory = save(model, tok, tmp_path / "mistral")
    _, meta, tensors = check_f32_round_trip(directory, tmp_path / "m.gguf")
    assert meta["general.architecture"] == "llama" and "output.weight" in tensors


def test_qwen2_uniform_is_unpermuted_and_per_layer_goes_to_deci(qwen_tok, tmp_path: Path) -> None:
    tok = qwen_tok
    directory = save(make_model("qwen2", dtype=torch.float32, vocab_size=len(tok)), tok, tmp_path / "qwen2")
    _, meta, tensors = check_f32_round_trip(directory, tmp_path / "q.gguf")  # compared without unpermuting
    assert meta["general.architecture"] == "qwen2" and "blk.0.attn_q.bias" in tensors
    # Only MLP channels removed: every layer keeps heads x head_dim = hidden, as llama.cpp's q bias needs.
    mlp_only = RemovalPlan({0: LayerPlan.of(channels=range(3)), 2: LayerPlan.of(channels=range(8))})
    pl = per_layer("qwen2", tok, tmp_path, mlp_only)
    _, meta, tensors = check_f32_round_trip(pl, tmp_path / "pq.gguf")  # q/k weights and biases unpermuted
    assert meta["general.architecture"] == "deci" and meta["surgeon.feed_forward_length"] == [37, 40, 32]
    assert meta["deci.feed_forward_length"] == [64, 64, 32]  # zero channels to multiples of 32
    k_bias = source_tensors(pl)["model.layers.0.self_attn.k_proj.bias"]
    assert not torch.equal(values(tensors["blk.0.attn_k.bias"]), k_bias)  # biases are permuted with their rows


def test_qwen3_uniform_keeps_qk_norms(qwen_tok, tmp_path: Path) -> None:
    tok = qwen_tok
    model = make_model("qwen3", dtype=torch.float32, vocab_size=len(tok), attention_bias=False)
    _, meta, tensors = check_f32_round_trip(save(model, tok, tmp_path / "qwen3"), tmp_path / "q3.gguf")
    assert meta["general.architecture"] == "qwen3" and "blk.1.attn_k_norm.weight" in tensors


def test_surgeon_checkpoint_with_equal_layers_uses_plain_llama(tok, tmp_path: Path) -> None:
    """A per-layer config whose layers are all equal (as written before equal layers became stock configs)."""
    from base.surgery import shrink_
    from export.pruned import _skeleton_with_weights, per_layer_config

    same = RemovalPlan({i: LayerPlan.of(channels=range(8)) for i in range(3)})
    model = make_model("llama", dtype=torch.float32, vocab_size=len(tok))
    shrink_(model, get_adapter("llama"), same)
    directory = tmp_path / "equal-per-layer"
    with torch.no_grad():
        _skeleton_with_weights(model, per_layer_config(model, get_adapter("llama"))).save_pretrained(directory)
    tok.save_pretrained(directory)
    assert json.loads((directory / "config.json").read_text())["model_type"] == "surgeon_llama"
    manifest, meta, _ = check_f32_round_trip(directory, tmp_path / "s.gguf")
    assert meta["general.architecture"] == "llama" and meta["llama.feed_forward_length"] == 32
    assert manifest["per_layer_shapes"] is False


def test_padded_mlp_reads_back_unpadded_and_q8_0_needs_no_f16_fallback(tok, tmp_path: Path) -> None:
    """A uniform MLP width of 40: written as 64 (zero channels, llama.cpp's fast matmul needs multiples of
    8-32), read back by our loader as the exact source tensors with width 40."""
    from transformers import LlamaForCausalLM

    from base.loading import load_model

    torch.manual_seed(1)
    model = LlamaForCausalLM(tiny_llama_config(len(tok), intermediate_size=40)).eval()
    directory = save(model, tok, tmp_path / "mlp40")
    manifest, meta, tensors = check_f32_round_trip(directory, tmp_path / "m.gguf")
    assert meta["llama.feed_forward_length"] == 64 and meta["surgeon.feed_forward_length"] == [40, 40]
    assert manifest["layers"][0]["intermediate_size"] == 40
    lm = load_model(tmp_path / "m.gguf")
    assert lm.model.config.intermediate_size == 40
    source = source_tensors(directory)
    for key, value in lm.model.state_dict().items():
        if key in source:
            assert torch.equal(value, source[key]), key
    q8 = export_gguf(directory, tmp_path / "q.gguf", tensor_type="q8_0")
    assert q8["f16_fallback"] == []  # ffn_down's rows (64) are whole Q8_0 blocks
    unpadded = export_gguf(directory, tmp_path / "u.gguf", tensor_type="f32", ffn_align=1)
    assert read(tmp_path / "u.gguf")[0]["llama.feed_forward_length"] == 40 and unpadded["ffn_align"] == 1


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_unsupported_architecture_is_named(tok, tmp_path: Path) -> None:
    directory = save(make_model("opt", dtype=torch.float32, vocab_size=len(tok)), tok, tmp_path / "opt")
    with pytest.raises(SurgeonError) as excinfo:
        export_gguf(directory, tmp_path / "o.gguf")
    message = one_line_error(excinfo)
    assert "'opt'" in message and "supported: llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text" in message
    assert list(tmp_path.glob("*.gguf")) == []


def test_unknown_tensor_type_lists_the_known_ones(llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SurgeonError) as excinfo:
        export_gguf(llama_dir, tmp_path / "x.gguf", tensor_type="q4_k")
    assert one_line_error(excinfo) == "GGUF tensor type must be one of F32, F16, BF16, Q8_0, got 'q4_k'"
    assert not (tmp_path / "x.gguf").exists()


def test_existing_output_needs_force(llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    with pytest.raises(SurgeonError) as excinfo:
        export_gguf(llama_dir, out)
    assert "exists" in one_line_error(excinfo) and "--force" in str(excinfo.value)
    assert out.read_bytes() == b"old"
    manifest = export_gguf(llama_dir, out, force=True)
    assert out.read_bytes()[:4] == b"GGUF" and manifest["bytes"] == out.stat().st_size
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert out.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # usual permissions, not a temp file's 0600


def test_failure_mid_write_leaves_no_file(llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = gguf.GGUFWriter.write_tensor_data

    def failing(self, tensor, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk full")
        return real(self, tensor, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(llama_dir, tmp_path / "new.gguf")
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary file
    old = tmp_path / "old.gguf"
    old.write_bytes(b"previous export")
    calls["n"] = 0
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(llama_dir, old, force=True)
    assert old.read_bytes() == b"previous export" and [p.name for p in tmp_path.iterdir()] == ["old.gguf"]


def test_shapes_llama_cpp_cannot_express_are_refused(qwen_tok, per_layer_dir: Path, tmp_path: Path) -> None:
    tok = qwen_tok
    with pytest.raises(SurgeonError) as excinfo:  # --uniform insists on one size for every layer
        export_gguf(per_layer_dir, tmp_path / "u.gguf", uniform=True)
    assert "--uniform" in one_line_error(excinfo) and "(35, 6, 2)" in str(excinfo.value)
    qwen3 = per_layer("qwen3", tok, tmp_path, PER_LAYER_PLAN, attention_bias=False)
    with pytest.raises(SurgeonError) as excinfo:  # deci has no Q/K norms
        export_gguf(qwen3, tmp_path / "q3.gguf")
    assert "--uniform" in one_line_error(excinfo) and "per-layer qwen3" in str(excinfo.value)
    qwen2 = per_layer("qwen2", tok, tmp_path, PER_LAYER_PLAN)
    with pytest.raises(SurgeonError) as excinfo:  # q bias with 3 heads x 8 != hidden 48
        export_gguf(qwen2, tmp_path / "q2.gguf")
    assert "hidden_size (48)" in one_line_error(excinfo)
    biased = save(make_model("qwen3", dtype=torch.float32, vocab_size=len(tok), attention_bias=True), tok,
                  tmp_path / "qwen3-bias")
    with pytest.raises(SurgeonError) as excinfo:  # llama.cpp's qwen3 reads no attention biases
        export_gguf(biased, tmp_path / "b.gguf")
    assert re.search(r"\(blk\.0\.attn_[qkv]\.bias\) is not read by llama\.cpp's 'qwen3'", one_line_error(excinfo))
    assert list(tmp_path.glob("*.gguf")) == []


def test_config_disagreeing_with_tensors_is_named(llama_dir: Path, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(llama_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(SurgeonError) as excinfo:
        export_gguf(bad, tmp_path / "x.gguf")
    assert one_line_error(excinfo) == (
        "tensor model.layers.0.mlp.down_proj.weight has shape [32, 64], but config.json says [32, 48]")


def test_cli_gguf(llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny.gguf"
    done = run_cli("gguf", str(llama_dir), "--type", "f32", "--out", str(out), "--json", "--quiet")
    assert done.returncode == 0, done.stderr
    manifest = json.loads(done.stdout)
    assert manifest["architecture"] == "llama" and out.is_file() and manifest["source"] == str(llama_dir)
    again = run_cli("gguf", str(llama_dir), "--out", str(out), "--quiet")
    assert again.returncode == 2 and again.stderr.startswith("error: output file exists")
    bad = run_cli("gguf", str(llama_dir), "--type", "q4_k", "--out", str(tmp_path / "x.gguf"))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "q8_0" in bad.stderr.lower()
    loud = run_cli("gguf", str(llama_dir), "--out", str(tmp_path / "loud.gguf"))  # progress on: ours only, none of the gguf package's
    assert loud.returncode == 0, loud.stderr
    assert "Endian" not in loud.stderr + loud.stdout and "Writing the following" not in loud.stderr + loud.stdout
    assert "wrote" in loud.stdout
    weights = (llama_dir / "model.safetensors").read_bytes()
    inside = run_cli("gguf", str(llama_dir), "--out", str(llama_dir / "model.safetensors"), "--force")
    assert inside.returncode == 2 and inside.stderr.startswith("error: --out") and inside.stderr.count("\n") == 1
    assert (llama_dir / "model.safetensors").read_bytes() == weights


# --- the Gemma family ---------------------------------------------------------------------------


def save_gemma(family: str, root: Path, **overrides) -> Path:
    """A tiny checkpoint of tests/families.py's ``family`` (its real configs' features) with a BOS-first
    tokenizer that has BPE merges (320 tokens), as llama.cpp's gpt2 tokenizer needs."""
    from tests.families import bos_tokenizer
    from tests.families import make_model as make_family

    tokenizer = bos_tokenizer(320)
    model = make_family(family, dtype=torch.float32, vocab_size=len(tokenizer), max_position_embeddings=512,
                        **overrides)
    return save(model, tokenizer, root / family)


GEMMA_ARCH = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3"}


@pytest.mark.parametrize("family", list(GEMMA_ARCH))
def test_gemma_tensors_and_metadata(family: str, tmp_path: Path) -> None:
    """Every tensor is the source's, but norms (1 + w, as Hugging Face's Gemma RMSNorm multiplies) and the
    tensor carrying query_pre_attn_scalar (6 here; llama.cpp scales q by 1/sqrt(head_dim 8))."""
    directory = save_gemma(family, tmp_path)
    manifest = export_gguf(directory, tmp_path / "g.gguf", tensor_type="f32")
    meta, tensors = read(tmp_path / "g.gguf")
    arch = GEMMA_ARCH[family]
    assert meta["general.architecture"] == arch == manifest["architecture"] and not manifest["qk_permuted"]
    source = source_tensors(directory)
    names = {"post_attention_norm.weight": "post_attention_layernorm.weight",
             "ffn_norm.weight": "pre_feedforward_layernorm.weight" if family != "gemma" else
             "post_attention_layernorm.weight",
             "post_ffw_norm.weight": "post_feedforward_layernorm.weight"}
    fold = (8 / 6) ** 0.5 if family != "gemma" else 1.0
    fold_into = {"gemma2": "attn_q.weight", "gemma3_text": "attn_q_norm.weight"}.get(family)
    assert manifest["query_scale_folded"] == pytest.approx(fold)
    assert "output.weight" not in tensors  # tied
    for name, t in tensors.items():
        rest = name.split(".", 2)[-1]
        hf = f"model.layers.{name.split('.')[1]}.{names[rest]}" if rest in names else hf_name(name)
        want = padded(name, source[hf], meta)
        if name.endswith("norm.weight"):
            want = want + 1
        if fold_into and name.endswith(fold_into):
            want = want * fold
        assert torch.equal(values(t), want), name
    assert len(tensors) == len(source)
    window = meta.get(f"{arch}.attention.sliding_window")
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern")
    if family == "gemma":
        assert window is None and pattern is None and f"{arch}.attn_logit_softcapping" not in meta
    elif family == "gemma2":  # layer_types sliding, full, sliding; both caps; one RoPE base
        assert (window, pattern) == (4, [True, False, True])
        assert meta["gemma2.attn_logit_softcapping"] == 5.0 and meta["gemma2.final_logit_softcapping"] == 3.0
        assert meta["gemma2.rope.freq_base_swa"] == meta["gemma2.rope.freq_base"] == 10000.0
    else:  # sliding, sliding, full; local base 10k unscaled, global 1M with linear x8
        assert (window, pattern) == (4, [True, True, False])
        assert meta["gemma3.rope.freq_base"] == 1e6 and meta["gemma3.rope.freq_base_swa"] == 1e4
        assert meta["gemma3.rope.scaling.type"] == "linear" and meta["gemma3.rope.scaling.factor"] == 8.0
        assert "gemma3.final_logit_softcapping" not in meta and "gemma3.attn_logit_softcapping" not in meta
    assert meta["tokenizer.ggml.add_bos_token"] is True


def test_gemma_what_llama_cpp_cannot_run_is_refused(tmp_path: Path) -> None:
    from tests.families import bos_tokenizer
    from tests.families import make_model as make_family

    tokenizer = bos_tokenizer(320)
    model = make_family("gemma2", dtype=torch.float32, vocab_size=len(tokenizer))
    shrink_and_save(model, tokenizer, get_adapter("gemma2"), tmp_path / "per-layer", ShrinkConfig(check_tokens=0),
                    plan=PER_LAYER_PLAN)
    with pytest.raises(SurgeonError) as excinfo:
        export_gguf(tmp_path / "per-layer", tmp_path / "p.gguf")
    assert "'gemma2' architecture creates every layer with layer 0's sizes" in one_line_error(excinfo)
    for family, overrides, message in [
        ("gemma2", {"attn_logit_softcapping": None}, "always soft-caps with attn_logit_softcapping"),
        ("gemma3_text", {"attn_logit_softcapping": 20.0}, "'gemma3' has no attn_logit_softcapping"),
        ("gemma", {"tie_word_embeddings": False}, "always uses the embeddings as the LM head"),
        ("gemma3_text", {"layer_types": ["sliding_attention", "chunked_attention", "full_attention"]},
         "layer_types must list sliding_attention or full_attention"),
    ]:
        built = {k: v for k, v in overrides.items() if k != "layer_types"}  # transformers builds no chunked layers
        directory = save_gemma(family, tmp_path / family / str(len(message)), **built)
        config = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps(config | overrides))
        with pytest.raises(SurgeonError) as excinfo:
            export_gguf(directory, tmp_path / "x.gguf")
        assert message in one_line_error(excinfo)
    assert list(tmp_path.glob("*.gguf")) == []


# --- issue #32: NaN weights, outputs that would replace the input, checksums, quiet output -------------


def with_nan(directory: Path, out: Path, key: str = "model.layers.1.mlp.up_proj.weight") -> Path:
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(directory, out)
    tensors = source_tensors(out)
    tensors[key][3, 5] = float("nan")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_nan_weight_is_refused_and_nothing_written(llama_dir: Path, tmp_path: Path) -> None:
    bad = with_nan(llama_dir, tmp_path / "nan")
    with pytest.raises(SurgeonError) as excinfo:
        export_gguf(bad, tmp_path / "out" / "m.gguf")
    assert "tensor model.layers.1.mlp.up_proj.weight holds 1 NaN value(s)" in one_line_error(excinfo)
    assert list((tmp_path / "out").iterdir()) == []


def test_out_inside_the_input_model_is_refused(llama_dir: Path, tmp_path: Path) -> None:
    import shutil

    model = Path(shutil.copytree(llama_dir, tmp_path / "m"))
    before = {f.name: f.read_bytes() for f in model.iterdir()}
    for out in (model / "model.safetensors", model / "config.json", model / "weights.bin", tmp_path / "m" / "."
                / "tokenizer.json"):
        with pytest.raises(SurgeonError) as excinfo:
            export_gguf(model, out, force=True)
        assert "inside the input model" in one_line_error(excinfo)
    (model / "README.md").write_text("the model's own card")
    with pytest.raises(SurgeonError) as excinfo:  # README.gguf's card would be README.md
        export_gguf(model, model / "README.gguf", force=True)
    assert "would replace the input model's README.md" in one_line_error(excinfo)
    assert {f.name: f.read_bytes() for f in model.iterdir() if f.name != "README.md"} == before
    export_gguf(model, model / "m.gguf")  # a .gguf beside the weights stays possible (and replaceable)
    export_gguf(model, model / "m.gguf", force=True)
    assert (model / "m.md").is_file()


def flip(path: Path, position: int, out: Path) -> Path:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x04
    out.write_bytes(bytes(data))
    return out


def test_checksums_catch_changed_bytes(llama_dir: Path, tmp_path: Path) -> None:
    """Every byte-flipped copy of one of our files is refused with one line (a changed tensor is named);
    a file of another writer (no checksum keys) still opens."""
    from base.loading import open_gguf

    good = tmp_path / "m.gguf"
    export_gguf(llama_dir, good, tensor_type="q8_0")
    reader = open_gguf(good)
    first_data = min(int(t.data_offset) for t in reader.tensors)
    embd = next(t for t in reader.tensors if t.name == "blk.1.ffn_up.weight")
    size, offset = good.stat().st_size, int(embd.data_offset)
    del reader
    with pytest.raises(SurgeonError) as excinfo:
        open_gguf(flip(good, offset + 100, tmp_path / "t.gguf"))
    assert one_line_error(excinfo).endswith("tensor blk.1.ffn_up.weight does not match its checksum "
                                            "(the file was changed or damaged)")
    rng = np.random.default_rng(0)
    positions = list(rng.integers(first_data, size, 30)) + list(rng.integers(8, first_data, 30))
    for i, position in enumerate(positions):
        with pytest.raises(SurgeonError) as excinfo:
            open_gguf(flip(good, int(position), tmp_path / f"f{i}.gguf"))
        one_line_error(excinfo)

    foreign = tmp_path / "foreign.gguf"
    writer = gguf.GGUFWriter(str(foreign), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert [t.name for t in open_gguf(foreign).tensors] == ["token_embd.weight"]


def test_changed_tensor_type_is_named(llama_dir: Path, tmp_path: Path) -> None:
    from base.loading import open_gguf

    path = tmp_path / "m.gguf"
    export_gguf(llama_dir, path, tensor_type="f32")
    reader = gguf.GGUFReader(str(path), "r+")
    t = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    t.field.parts[4][0] = int(gguf.GGMLQuantizationType.F16)  # the type id in the tensor info
    reader.data.flush()
    del reader
    with pytest.raises(SurgeonError) as excinfo:
        open_gguf(path)
    assert "tensor blk.0.attn_q.weight does not match its checksum" in one_line_error(excinfo)
