"""Checksums of our own formats: a changed value, a different valid 2:4 nibble or a NaN in a pack, or a changed
tensor in the GGUF conversion cache, is one line naming the tensor; an old pack loads with a warning."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import pytest
import torch

from base import loading
from base.errors import SurgeonError
from base.formats import PACK_MANIFEST_FILE, PACK_WEIGHTS_FILE
from base.integrity import source_identity, tensor_checksums
from base.loading import load_model
from export.sparse_checkpoint import PackConfig, densify, pack_checkpoint
from runtime.load import load_compressed
from tests.conftest import make_tokenizer, tiny_llama_config
from tests.test_semi_structured import pruned_24_dir

Q = "model.layers.0.self_attn.q_proj.weight"


def tensor_span(path: Path, name: str) -> tuple[int, int]:
    """Absolute byte range of tensor ``name`` in a safetensors file."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    begin, end = json.loads(raw[8:8 + n])[name]["data_offsets"]
    return 8 + n + begin, 8 + n + end


def edit_bytes(path: Path, name: str, edit) -> None:
    """Change tensor ``name``'s bytes in place (same length: the header and every other tensor stay)."""
    raw = bytearray(path.read_bytes())
    a, b = tensor_span(path, name)
    new = edit(bytes(raw[a:b]))
    assert len(new) == b - a and new != raw[a:b]
    raw[a:b] = new
    path.write_bytes(bytes(raw))


def flip_mantissa(data: bytes) -> bytes:
    return bytes([data[0] ^ 0x01]) + data[1:]


def nan_first(data: bytes) -> bytes:
    return struct.pack("<f", float("nan")) + data[4:]


def swap_meta_nibble(data: bytes) -> bytes:
    """Another valid 2:4 position code: swap two metadata bytes that differ (both valid codes)."""
    j = next(i for i in range(1, len(data)) if data[i] != data[0])
    out = bytearray(data)
    out[0], out[j] = data[j], data[0]
    return bytes(out)


@pytest.fixture
def packed(tmp_path: Path) -> Path:
    _, src = pruned_24_dir(tmp_path)
    out = tmp_path / "packed"
    pack_checkpoint(load_model(src), out, PackConfig("2:4"))
    return out


def test_pack_manifest_records_every_tensor(packed: Path) -> None:
    manifest = json.loads((packed / PACK_MANIFEST_FILE).read_text())
    assert manifest["checksums"] == tensor_checksums(packed / PACK_WEIGHTS_FILE)
    assert {f"{Q}.values", f"{Q}.meta", "model.norm.weight"} <= set(manifest["checksums"])
    load_compressed(packed)  # the untouched pack loads


@pytest.mark.parametrize("part, edit", [("values", flip_mantissa), ("values", nan_first), ("meta", swap_meta_nibble)],
                         ids=["changed value", "NaN", "other valid nibble"])
def test_a_changed_pack_is_refused_naming_the_tensor(packed: Path, part: str, edit) -> None:
    edit_bytes(packed / PACK_WEIGHTS_FILE, f"{Q}.{part}", edit)
    message = f"tensor {Q}.{part} does not match its checksum in {PACK_MANIFEST_FILE}"
    with pytest.raises(SurgeonError, match=message):
        load_compressed(packed)
    with pytest.raises(SurgeonError, match=message):
        densify(packed, packed.parent / "dense")
    assert not (packed.parent / "dense").exists()


def test_a_pack_without_checksums_loads_with_a_warning(packed: Path, caplog: pytest.LogCaptureFixture) -> None:
    manifest = json.loads((packed / PACK_MANIFEST_FILE).read_text())
    del manifest["checksums"]
    (packed / PACK_MANIFEST_FILE).write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING):
        cm = load_compressed(packed)
    assert "has no checksums" in caplog.text
    assert cm.counts["decoder_linear"] > 0


def test_the_gguf_cache_is_verified_on_every_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import LlamaForCausalLM

    from export.gguf import export_gguf

    monkeypatch.setenv(loading.CACHE_ENV, str(tmp_path / "cache"))
    tok = make_tokenizer(vocab_size=320)  # real merges: llama.cpp's tokenizer needs them
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tok))).eval()
    model.save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    gguf = tmp_path / "m.gguf"
    export_gguf(tmp_path / "src", gguf, tensor_type="f32")
    lm = load_model(gguf)
    record = json.loads((lm.path / "surgeon_source.json").read_text())
    assert record["checksums"] == {"model.safetensors": tensor_checksums(lm.path / "model.safetensors")}
    load_model(gguf)  # cached, verified
    edit_bytes(lm.path / "model.safetensors", "model.norm.weight", flip_mantissa)
    with pytest.raises(SurgeonError, match="tensor model.norm.weight does not match its checksum .*remove .* to rebuild"):
        load_model(gguf)


def test_source_identity_sees_weights_not_only_shapes(tmp_path: Path) -> None:
    from tests.conftest import make_tiny_llama

    ids = []
    for seed in (0, 1, 0):
        model, tok = make_tiny_llama(seed=seed)
        model.save_pretrained(tmp_path / str(seed))
        ids.append(source_identity(tmp_path / str(seed) / "config.json", [tmp_path / str(seed) / "model.safetensors"]))
    assert ids[0] == ids[2] != ids[1]
