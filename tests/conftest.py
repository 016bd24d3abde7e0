"""Shared fixtures: tiny randomly initialised Llama models (GQA) with a tokenizer, built offline."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

# Tests never reach a hub, even by accident.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Under pytest-xdist (the README's `-n 2`) each worker gets one core: one torch thread, and one for
# the processes it spawns. Two workers with two threads each on a 2-core machine oversubscribe it,
# and torch's threaded kernels then stall.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)

CORPUS = (
    "The quick brown fox jumps over the lazy dog. A model that is pruned should still read text. "
    "Sparse matrices store fewer numbers; dense matrices store them all. Layers, heads and channels "
    "can be removed when their cost is small. 0123456789 = + - * / ( ) [ ] { } , ; : ! ? "
)


def make_tokenizer(vocab_size: int = 96):
    """A byte-level BPE tokenizer trained on a few sentences (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def tiny_llama_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
        bos_token_id=0, eos_token_id=1, tie_word_embeddings=True,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def make_tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A seeded 2-layer Llama with GQA (4 query heads, 2 KV heads, hidden 32) and its tokenizer."""
    from transformers import LlamaForCausalLM

    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer), **overrides)).to(dtype).eval()
    return model, tokenizer


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_llama_dir(tmp_path: Path) -> Path:
    """A saved tiny Llama checkpoint directory (config, safetensors, tokenizer)."""
    model, tokenizer = make_tiny_llama()
    out = tmp_path / "tiny-llama"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(CORPUS * 40)
    return path


@pytest.fixture(scope="session")
def default_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """The default model, loaded, and its ONNX export (one export per test session): (lm, out, manifest)."""
    from base.loading import load_model
    from export.onnx import export_onnx

    lm = load_model()
    out = tmp_path_factory.mktemp("default-onnx") / "onnx"
    manifest = export_onnx(lm.model, lm.tokenizer, out, source=lm.source, source_dir=lm.path)
    return lm, out, manifest


def cached_logits(decoder: object, chunks: list[torch.Tensor]) -> torch.Tensor:
    """Logits ``[B, T, V]`` of ``chunks`` fed one after another through the decoder's cache."""
    batch = chunks[0].shape[0]
    decoder.reset(batch)  # type: ignore[attr-defined]
    seen, out = 0, []
    for chunk in chunks:
        t = chunk.shape[1]
        mask = torch.ones(batch, seen + t, dtype=torch.long)
        out.append(decoder.forward(chunk, mask, torch.arange(seen, seen + t).expand(batch, t)))  # type: ignore[attr-defined]
        seen += t
    return torch.cat(out, dim=1)


def dead_pid() -> int:
    """The id of a process that has ended (a child run to completion)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def killed_writers_temporary(target: Path, directory: bool = False) -> Path:
    """What a writer of ``target`` killed mid-write leaves beside it (base/files.py's name, a process
    that is gone, an hour old): the next run's cleaner for ``target`` must remove it."""
    temporary = target.with_name(f".{target.name}.tmp-{dead_pid()}-abcd1234")
    if directory:
        temporary.mkdir(parents=True)
        (temporary / "model.safetensors").write_bytes(b"half")
    else:
        temporary.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_bytes(b"half")
    old = time.time() - 3600
    os.utime(temporary, (old, old))
    return temporary


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory's safetensors files, by name."""
    from benchmarks.distributed import read_tensors

    return read_tensors(directory)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files with `slow` tests (the real default model: minutes each) first, the rest in their order: under
    `-n 2 --dist loadfile` the long files then start at once instead of leaving one worker alone at the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: order within each group kept
