"""The one loader: HF directories, GGUF files, the default model, and every kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from base import loading
from base.errors import SurgeonError
from base.loading import check_safetensors, count_parameters, load_model
from tests.conftest import make_tiny_llama


def test_loads_hf_dir_with_identical_logits(tiny_llama_dir: Path) -> None:
    reference, _ = make_tiny_llama()
    lm = load_model(tiny_llama_dir)
    ids = torch.tensor([[0, 5, 9, 17, 3]])
    assert not lm.model.training
    assert lm.adapter.family == "llama"
    torch.testing.assert_close(lm.model(ids).logits, reference(ids).logits, rtol=0, atol=0)
    assert lm.tokenizer("fox")["input_ids"]


def test_count_parameters_counts_tied_weights_once_and_zeros(tiny_llama_dir: Path) -> None:
    lm = load_model(tiny_llama_dir)
    linears = lm.adapter.decoder_linears(lm.model)
    assert len(linears) == 2 * 7
    first = next(iter(linears.values()))
    with torch.no_grad():
        first.weight[0, :5] = 0
    counts = count_parameters(lm.model, lm.adapter)
    expected_total = sum(p.numel() for p in lm.model.parameters())  # parameters() dedups tied ones
    assert counts["total"] == expected_total
    assert counts["decoder_linear"] == sum(m.weight.numel() for m in linears.values())
    assert counts["decoder_linear_zeros"] == 5


def test_missing_path() -> None:
    with pytest.raises(SurgeonError, match="model path not found"):
        load_model("/no/such/model")


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(SurgeonError, match="no config.json"):
        load_model(tmp_path)


def test_unsupported_architecture(tiny_llama_dir: Path) -> None:
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    config["model_type"] = "gpt2"
    (tiny_llama_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(SurgeonError, match="unsupported architecture 'gpt2'; supported: llama"):
        load_model(tiny_llama_dir)


def test_invalid_config_json(tiny_llama_dir: Path) -> None:
    (tiny_llama_dir / "config.json").write_text("{not json")
    with pytest.raises(SurgeonError, match="not valid JSON"):
        load_model(tiny_llama_dir)


def test_refuses_pickled_weights(tiny_llama_dir: Path) -> None:
    (tiny_llama_dir / "model.safetensors").unlink()
    (tiny_llama_dir / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(SurgeonError, match="pickled weights"):
        load_model(tiny_llama_dir)


def test_truncated_safetensors(tiny_llama_dir: Path) -> None:
    weights = tiny_llama_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(SurgeonError, match="corrupt or truncated safetensors file .*model.safetensors"):
        load_model(tiny_llama_dir)


def test_garbage_safetensors(tmp_path: Path) -> None:
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises(SurgeonError, match="corrupt or truncated"):
        check_safetensors(bad)


def test_checkpoint_missing_a_tensor_is_refused(tiny_llama_dir: Path) -> None:
    weights = tiny_llama_dir / "model.safetensors"
    state = load_file(weights)
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(SurgeonError, match="tensor model.layers.1.mlp.down_proj.weight is missing from the checkpoint"):
        load_model(tiny_llama_dir)


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    other = tmp_path / "weights.txt"
    other.write_text("hello")
    with pytest.raises(SurgeonError, match="not a .gguf file"):
        load_model(other)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(SurgeonError, match="not a GGUF file"):
        load_model(fake)


def test_truncated_gguf_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(loading.CACHE_ENV, str(tmp_path / "cache"))
    real = loading.default_gguf()
    truncated = tmp_path / "truncated.gguf"
    with real.open("rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    with pytest.raises(SurgeonError, match="cannot read GGUF file .*truncated.gguf"):
        load_model(truncated)
    leftovers = list((tmp_path / "cache" / "gguf").iterdir())
    assert leftovers == []


def test_failed_cache_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(loading.CACHE_ENV, str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)

    def fail(src: Path, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(loading, "_convert_gguf", fail)
    with pytest.raises(SurgeonError, match="^cannot write .*: disk full; nothing was written"):  # one line, no traceback
        load_model(gguf)
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(loading.CACHE_ENV, str(tmp_path))
    assert loading.cache_dir() == tmp_path
    monkeypatch.delenv(loading.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert loading.cache_dir() == tmp_path / "xdg" / "surgeon-export"
