"""One backend protocol and one registry: every runtime that ``generate`` and ``bench`` can use.

A backend is a model loaded on one runtime (:class:`Backend`): a causal LM that keeps its own KV
cache (``reset`` and ``forward``, which :func:`runtime.generate.generate` drives), scores whole
windows for perplexity (``logits``), and describes the artefact it runs (``describe``, the
benchmark runner's schema, docs/benchmarks.md). Backends register a loader by name; the built-in
ones are registered below, lazily, so that naming a backend imports its runtime and nothing else.
A new runtime is one module with a loader plus one :func:`register_backend` line here.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from base.errors import SurgeonError
from base.formats import DTYPES, REPORT_FILE

BENCH_DTYPES = ("float32", "float16", "bfloat16")  # what --dtype of bench and generate accepts besides auto


class Backend(Protocol):
    """A causal LM on one runtime that keeps the keys and values of every token since ``reset``."""

    name: str  # the registered backend name
    device: torch.device
    config: Any  # the model's Hugging Face config (shapes, vocabulary, context)
    tokenizer: Any
    directory: Path  # where the model's files are (config, tokenizer, report)
    vocab_size: int

    def reset(self, batch_size: int) -> None:
        """Drop the cache; the next ``forward`` starts ``batch_size`` new sequences."""

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, last_only: bool = False) -> Tensor:
        """Run new tokens ``[B, T]`` after the cached ones and cache them; returns float32 logits.

        ``attention_mask`` ``[B, P + T]`` covers cached and new tokens, ``position_ids`` ``[B, T]``;
        all int64 on CPU. Logits are ``[B, T, V]``, or ``[B, 1, V]`` (last position) if ``last_only``.
        """

    def logits(self, input_ids: Tensor) -> Tensor:
        """Float32 logits ``[B, T, V]`` of whole windows ``[B, T]`` from an empty cache (perplexity)."""

    def describe(self) -> dict:
        """Artefact facts: source, path, bytes on disk, parameters and zeros, pruning settings, dtype, FLOPs."""


def hf_config(directory: Path, where: str = "") -> Any:
    """The Hugging Face config of the model files a backend runs (never code from the directory)."""
    from transformers import AutoConfig

    from base.loading import quiet_transformers

    with quiet_transformers():
        try:
            return AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise SurgeonError(f"{directory}: no usable config.json{where} ({exc})") from None


class CachedLogits:
    """``logits`` through the cache: reset, then one pass over the whole windows (for any :class:`Backend`)."""

    def logits(self: Any, input_ids: Tensor) -> Tensor:
        batch, length = input_ids.shape
        self.reset(batch)
        mask = torch.ones(batch, length, dtype=torch.long)
        return self.forward(input_ids, mask, torch.arange(length).expand(batch, length))


# (model path or None for the default model, device, dtype name or "auto", threads) -> Backend
Loader = Callable[[str | None, str, str, int | None], Backend]


BACKENDS: dict[str, Loader] = {}


def register_backend(name: str, load: Loader) -> None:
    """Make a backend available to :func:`load_backend` (``generate --backend``, ``bench --backend``)."""
    BACKENDS[name] = load


def backend_python(name: str) -> str | None:
    """The interpreter backend ``name`` runs in: None for this one; vLLM's own environment for
    ``vllm`` where vLLM is not installed here (a SurgeonError if it has not been created)."""
    if name != "vllm":
        return None
    from runtime.vllm_env import backend_python as vllm_python

    return vllm_python()


def check_backend(name: str) -> Loader:
    """The loader of backend ``name``; a SurgeonError lists the others."""
    if name not in BACKENDS:
        raise SurgeonError(f"unknown runtime backend {name!r}; available: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name]


def load_backend(name: str, spec: str | Path | None = None, *, device: str = "cpu", dtype: str = "auto",
                 threads: int | None = None) -> Backend:
    """The model at ``spec`` (None or ``"default"``: the default model) loaded on backend ``name``.

    Example:
        >>> backend = load_backend("onnxruntime", "small-onnx")  # doctest: +SKIP
        >>> backend.forward(ids, mask, positions, last_only=True).shape  # doctest: +SKIP
        torch.Size([1, 1, 49152])
    """
    load = check_backend(name)
    check_device(device)
    spec = None if spec is None or str(spec) == "default" else str(spec)
    resolve_dtype(dtype, device)  # a bad --dtype is refused before anything loads
    if threads is not None:
        if threads < 1:
            raise SurgeonError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    return load(spec, device, dtype, threads)


def check_device(name: str) -> None:
    """``--device``: ``cpu``, ``cuda`` or ``cuda:N`` of a visible GPU; anything else is refused here,
    before a load that would fail with torch's own assertion deep inside."""
    import re

    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if name == "cpu":
        return
    if match is None:
        raise SurgeonError(f"--device {name}: choose cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise SurgeonError(f"--device {name}: no CUDA GPU is visible")
    if match[1] is not None and int(match[1]) >= torch.cuda.device_count():
        raise SurgeonError(f"--device {name}: only {torch.cuda.device_count()} CUDA GPU(s) visible")


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """``--dtype``: ``auto`` is float16 on CUDA (what GPU inference runs) and float32 on CPU (torch's
    CPU half-precision matmuls are slow and the protocol's perplexity is float32)."""
    if name == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if name not in BENCH_DTYPES:
        raise SurgeonError(f"--dtype {name}: choose auto, {', '.join(BENCH_DTYPES)}")
    return DTYPES[name]


def pruning_config(directory: Path) -> dict | None:
    """The pruning settings recorded beside a model (``surgeon_report.json``), if any."""
    report = Path(directory) / REPORT_FILE
    return json.loads(report.read_text()).get("config") if report.is_file() else None


def _lazy(module: str, function: str, **options: str) -> Loader:
    """A loader that imports its runtime only when the backend is used."""

    def load(spec: str | None, device: str, dtype: str, threads: int | None) -> Backend:
        return getattr(importlib.import_module(module), function)(spec, device, dtype, threads, **options)

    return load


register_backend("torch", _lazy("runtime.torch_backend", "load_torch"))
register_backend("onnxruntime", _lazy("runtime.ort", "load_onnxruntime"))
register_backend("openvino", _lazy("runtime.openvino", "load_openvino"))  # pip install surgeon-export[openvino]
register_backend("llama.cpp", _lazy("runtime.llama_cpp", "load_llama_cpp"))  # GGUF on llama.cpp (extra "llama")
register_backend("vllm", _lazy("runtime.vllm", "load_vllm"))  # vLLM, in its own environment (docs/vllm.md)
for _packed in ("torch-24", "torch-24-sparse", "torch-csr"):  # packed checkpoints (surgeon-export pack)
    register_backend(_packed, _lazy("runtime.load", "load_packed", backend=_packed))
