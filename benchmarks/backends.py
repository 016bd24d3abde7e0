"""Backends the benchmark runner can measure a model with, and a registry to add more.

A backend turns a model spec (a path, or None for the default model) into a :class:`Runner`, which
knows how to describe the artefact, evaluate perplexity and time prefill and decode. Only
``"torch"`` (eager PyTorch through :func:`surgeon.loading.load_model`) exists today; an ONNX Runtime
backend or one running under another torch install (``python=`` an interpreter of that
environment; the runner then lives in a worker process of that interpreter) registers itself with
:func:`register_backend`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch

from benchmarks import latency
from surgeon.errors import SurgeonError

PRUNING_REPORT = "surgeon_report.json"  # written by export.checkpoint next to pruned weights


class Runner(Protocol):
    """One loaded model on one backend; every method is called inside a worker."""

    device: torch.device

    def describe(self) -> dict:
        """Artefact facts: source, path, bytes on disk, parameter and zero counts, pruning settings."""

    def check(self, batch: int, length: int) -> str | None:
        """Why a forward over ``[batch, length]`` (prompt plus new tokens) cannot run, or None."""

    def perplexity(self, windows: int | None, seq_len: int, batch_size: int, text: str | None,
                   data_dir: str | None, progress: bool) -> dict:
        """Protocol perplexity (benchmarks.metrics) as a dict."""

    def prefill(self, batch: int, length: int, seed: int) -> float:
        """Seconds for one prefill of a synthetic ``[batch, length]`` prompt."""

    def decode(self, batch: int, length: int, new_tokens: int, seed: int) -> float:
        """Seconds for ``new_tokens`` greedy KV-cache steps after a synthetic ``[batch, length]`` prompt."""


@dataclass(frozen=True)
class Backend:
    """A registered backend: how to load a runner, and which interpreter its worker needs."""

    name: str
    load: Callable[[str | None, str, str], Runner]  # (model spec, device, dtype name or "auto") -> Runner
    python: str | None = None  # interpreter for process isolation; None: the current one


BACKENDS: dict[str, Backend] = {}
FLOP_LENGTHS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def flops_table(config: object) -> dict[str, float]:
    """Matmul FLOPs per token (export/flops.py) at several sequence lengths, for FLOP ratios per cell."""
    from export.flops import matmul_flops_per_token

    return {str(n): matmul_flops_per_token(config, n)["total"] for n in FLOP_LENGTHS}


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def bench_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """``--dtype`` of ``bench``: ``auto`` is float16 on CUDA (what GPU inference runs) and float32 on
    CPU (torch's CPU half-precision matmuls are slow and the protocol's perplexity is float32)."""
    if name == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise SurgeonError(f"--dtype {name}: choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def register_backend(backend: Backend) -> None:
    """Make ``backend`` available to ``surgeon-export bench --backend NAME``."""
    BACKENDS[backend.name] = backend


def get_backend(name: str) -> Backend:
    """The registered backend called ``name`` (a SurgeonError lists the others)."""
    if name not in BACKENDS:
        raise SurgeonError(f"unknown backend {name!r}; available: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name]


class TorchRunner:
    """Eager PyTorch through the project's one loader (float32 on CPU, float16 on CUDA by default)."""

    def __init__(self, spec: str | None, device: str, dtype: str = "auto") -> None:
        from surgeon.loading import load_model

        self.device = torch.device(device)
        try:
            self.lm = load_model(spec, device=self.device, dtype=bench_dtype(dtype, self.device))
        except SurgeonError as exc:
            raise SurgeonError(f"backend torch cannot run {spec or 'the default model'}: {exc}") from None
        self.model = self.lm.model
        self.config: Any = self.model.config  # a transformers PretrainedConfig
        self._prompts: dict[tuple[int, int, int], torch.Tensor] = {}

    def describe(self) -> dict:
        from surgeon.loading import count_parameters

        counts = count_parameters(self.model, self.lm.adapter)
        unique = {p.data_ptr(): p for p in self.model.parameters()}.values()  # tied weights once
        report = self.lm.path / PRUNING_REPORT
        pruning = json.loads(report.read_text()).get("config") if report.is_file() else None
        return {
            "source": self.lm.source,
            "path": str(self.lm.path),
            "bytes_on_disk": sum(f.stat().st_size for f in Path(self.lm.path).glob("*.safetensors")),
            "weight_bytes": sum(p.numel() * p.element_size() for p in unique),
            "parameters": {**counts, "total_zeros": sum(int((p == 0).sum()) for p in unique)},
            "sparsity": counts["decoder_linear_zeros"] / counts["decoder_linear"],
            "pruning": pruning,
            "dtype": str(next(iter(unique)).dtype).removeprefix("torch."),
            "flops_per_token": flops_table(self.model.config),
        }

    def check(self, batch: int, length: int) -> str | None:
        return latency.cell_problem(self.config, self.device, batch, length)

    def perplexity(self, windows: int | None, seq_len: int, batch_size: int, text: str | None,
                   data_dir: str | None, progress: bool) -> dict:
        from benchmarks.metrics import perplexity
        from surgeon.data import check_window, eval_tokens

        check_window(seq_len, self.model)
        tokens = eval_tokens(self.lm.tokenizer, text, data_dir)
        result = perplexity(self.model, tokens.ids, seq_len=seq_len, max_windows=windows,
                            batch_size=batch_size, progress=progress)
        return {**result.to_dict(), "text": tokens.origin}

    def _prompt(self, batch: int, length: int, seed: int) -> torch.Tensor:
        key = (batch, length, seed)
        if key not in self._prompts:
            self._prompts = {key: latency.synthetic_prompt(
                batch, length, self.config.vocab_size, seed).to(self.device)}
        return self._prompts[key]

    def prefill(self, batch: int, length: int, seed: int) -> float:
        return latency.time_prefill(self.model, self._prompt(batch, length, seed))

    def decode(self, batch: int, length: int, new_tokens: int, seed: int) -> float:
        return latency.greedy_decode(self.model, self._prompt(batch, length, seed), new_tokens)[1]


register_backend(Backend("torch", TorchRunner))


def _load_onnxruntime(spec: str | None, device: str, dtype: str = "auto") -> Runner:
    import numpy as np

    from benchmarks.onnx_backend import OrtRunner  # onnxruntime is imported only when this backend is used

    runner = OrtRunner(spec, device)
    exported = np.dtype(runner.decoder.dtype).name  # "float32" or "float16"
    if dtype != "auto" and exported != dtype:
        raise SurgeonError(f"backend onnxruntime runs {spec} in the dtype it was exported in ({exported}), "
                           f"not {dtype}; export with `surgeon-export onnx --dtype`")
    return runner


register_backend(Backend("onnxruntime", _load_onnxruntime))


class CompressedRunner(TorchRunner):
    """A compressed checkpoint (``surgeon-export pack``) through :func:`runtime.load.load_backend`.

    ``torch-24``: 2:4 weights as semi-structured sparse tensors in float16 on a CUDA sm80+ GPU where
    they were measured faster than dense (dense below the token count where they are not; dense
    float32 on CPU); ``torch-24-sparse``: 2:4 kernels wherever they run (least memory).
    ``torch-csr``: CSR/BSR weights through ``torch.sparse.mm``, float32.
    """

    def __init__(self, spec: str | None, device: str, dtype: str = "auto", backend: str = "torch-24") -> None:
        from runtime.load import load_backend

        if spec is None:
            raise SurgeonError(f"backend {backend} needs a directory written by `surgeon-export pack`, not the default model")
        self.device = torch.device(device)
        self.compressed = load_backend(backend, spec, self.device, None if dtype == "auto" else bench_dtype(dtype, device))
        self.lm = self.compressed.lm
        self.model = self.lm.model
        self.config = self.model.config
        self._prompts = {}

    def describe(self) -> dict:
        return {**self.compressed.describe(), "flops_per_token": flops_table(self.model.config)}


for _name in ("torch-24", "torch-24-sparse", "torch-csr"):
    register_backend(Backend(_name, partial(CompressedRunner, backend=_name)))
