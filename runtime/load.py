"""Load a compressed checkpoint (``surgeon-export pack``) into a runnable Hugging Face model.

As gpt-fast:generate.py ``_load_model`` does: the model ``config.json`` describes is built on the
meta device, and the stored tensors are assigned into it. Reading and every check (manifest,
version, header, metadata against values, shapes against the config) happen in
:func:`export.sparse_checkpoint.read_compressed`; the config and tokenizer come through the pieces
of :mod:`base.loading`. Then the packed decoder linears are placed:

- N:M (2:4; another N:M layer only where its weights are also 2:4): unpacked; on a CUDA GPU each
  layer becomes a semi-structured sparse tensor on the kernel :func:`runtime.semi_structured.choose_backend` picks, and layers it cannot take stay dense with
  the reason recorded (:attr:`CompressedModel.placements`); under the ``auto`` policy each distinct
  kernel shape is first timed against dense on the device (:func:`runtime.semi_structured.tune`):
  layers whose kernel is never faster stay dense, and layers whose kernel is faster only from some
  token count on keep a dense copy for smaller calls (decode). On CPU all stay dense, with a
  one-line notice;
- CSR / BSR: each ``nn.Linear`` is replaced by a :class:`runtime.sparse_linear.SparseLinear`.

Non-persistent buffers (the rotary ``inv_freq``) are not stored; the model's own ``_init_weights``
computes them, as transformers does after its own meta-device load.

:func:`load_packed` is what the runtime backends ``torch-24``, ``torch-24-sparse`` and ``torch-csr``
run (layouts, dtype and 2:4 policy per backend; registered in :mod:`runtime.backend`).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from base.adapters import get_adapter
from base.errors import SurgeonError
from base.formats import DTYPES, PACK_WEIGHTS_FILE, dtype_name
from base.lazy import materialise_buffers
from base.loading import LoadedModel, load_tokenizer
from base.patterns import NMPattern
from export.flops import flops_table
from export.sparse_checkpoint import CompressedCheckpoint, nm_pattern, read_compressed
from runtime.backend import pruning_config, resolve_dtype
from runtime.semi_structured import (
    Dispatch,
    Policy,
    Prefer,
    device_dispatch,
    to_semi_structured_linear,
    tune,
    tuned,
)
from runtime.sparse_linear import SparseLinear
from runtime.torch_backend import TorchBackend

log = logging.getLogger(__name__)
BACKEND_LAYOUTS = {"torch-24": ("N:M",), "torch-24-sparse": ("N:M",), "torch-csr": ("csr", "bsr")}  # layouts read
BACKEND_POLICY: dict[str, Policy] = {"torch-24-sparse": "sparse"}  # 2:4 policy per backend; others "auto"


def backend_dtype(backend: str, device: torch.device) -> torch.dtype:
    """2:4 backends: float16 on CUDA (the 2:4 kernels' dtype), float32 on CPU; ``torch-csr``: float32."""
    return torch.float16 if "N:M" in BACKEND_LAYOUTS[backend] and device.type == "cuda" else torch.float32


@dataclass
class CompressedModel:
    """A loaded compressed checkpoint: the model, where each packed linear runs, and stored counts."""

    lm: LoadedModel
    layout: str
    placements: dict[str, Dispatch]  # packed weight key -> kernel, reason and kernel shape
    counts: dict[str, int] = field(default_factory=dict)  # parameters and zeros counted in the stored tensors

    def kernels(self) -> dict[str, int]:
        """How many packed linears run on each kernel."""
        return dict(Counter(d.kernel for d in self.placements.values()))

    def fallbacks(self) -> dict[str, str]:
        """Packed N:M linears left dense on a GPU, with the reason (empty on CPU and for CSR/BSR)."""
        if self.lm.model.device.type != "cuda" or nm_pattern(self.layout) is None:
            return {}
        return {k: d.reason for k, d in self.placements.items() if d.kernel == "dense"}

    def dense_below(self) -> dict[str, int]:
        """Packed 2:4 linears that run dense (on a kept dense copy) for calls of fewer tokens than this."""
        return {k: d.dense_below for k, d in self.placements.items() if d.dense_below}

    def describe(self) -> dict:
        """Artefact facts in the benchmark runner's schema (``docs/benchmarks.md``), plus the kernels used."""
        model = self.lm.model
        tensors = [*model.parameters(), *model.buffers()]  # each shared tensor once
        dtype = next(p.dtype for p in model.parameters())
        return {
            "source": self.lm.source,
            "path": str(self.lm.path),
            "bytes_on_disk": (self.lm.path / PACK_WEIGHTS_FILE).stat().st_size,
            "weight_bytes": sum(tensor_bytes(t) for t in tensors),
            "parameters": {k: self.counts[k] for k in ("total", "decoder_linear", "decoder_linear_zeros", "total_zeros")},
            "sparsity": self.counts["decoder_linear_zeros"] / self.counts["decoder_linear"],
            "pruning": pruning_config(self.lm.path),
            "dtype": dtype_name(dtype),
            "format": self.layout,
            "kernels": self.kernels(),
            "fallbacks": self.fallbacks(),
            "dense_below": self.dense_below(),
        }


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds: the index and value parts of CSR/BSR, the packed parts of 2:4 tensors."""
    from torch.sparse import SparseSemiStructuredTensor

    parts: list[torch.Tensor | None] = [t]
    if isinstance(t, SparseSemiStructuredTensor):
        parts = [t.packed, t.meta, t.packed_t, t.meta_t, t.compressed_swizzled_bitmask]
    elif t.layout in (torch.sparse_csr, torch.sparse_bsr):
        parts = [t.crow_indices(), t.col_indices(), t.values()]
    return sum(p.numel() * p.element_size() for p in parts if p is not None)


def _count(ckpt: CompressedCheckpoint) -> dict[str, int]:
    """Parameters and zeros as stored: dense tensors, and the packed weights' full shapes."""
    stored_zeros = {k: p.shape[0] * p.shape[1] - int((p.parts["values"] != 0).sum()) for k, p in ckpt.packed.items()}
    linear = sum(p.shape[0] * p.shape[1] for p in ckpt.packed.values())
    dense = sum(t.numel() for t in ckpt.dense.values())
    dense_zeros = sum(int((t == 0).sum()) for t in ckpt.dense.values())
    return {"total": dense + linear, "decoder_linear": linear, "decoder_linear_zeros": sum(stored_zeros.values()),
            "total_zeros": dense_zeros + sum(stored_zeros.values())}


def load_compressed(
    spec: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    prefer: Prefer = "auto",
    policy: Policy = "auto",
    layouts: tuple[str, ...] | None = None,
) -> CompressedModel:
    """Build the model stored in a compressed directory, in eval mode.

    Args:
        spec: the directory ``surgeon-export pack`` wrote.
        device: where to run; 2:4 kernels are used on CUDA sm80+ GPUs only.
        dtype: floating dtype of the loaded model (default: the stored dtype).
        prefer: 2:4 kernel choice on GPU (``auto``, ``cusparselt`` or ``cutlass``).
        policy: ``auto``: time each 2:4 kernel shape against dense on the GPU and use whichever is
            faster per layer and call size (dense copies cost memory); ``sparse``: 2:4 kernels
            wherever they run, nothing timed (the least memory).
        layouts: accept only these layouts (a backend's; ``"N:M"`` stands for every N:M pattern), else a SurgeonError.

    Example:
        >>> cm = load_compressed("m24-packed")  # doctest: +SKIP
        >>> cm.kernels()  # doctest: +SKIP
        {'dense': 210}
    """
    directory = Path(spec).expanduser()
    if not directory.is_dir():
        raise SurgeonError(f"compressed checkpoint directory not found: {directory}")
    device = torch.device(device)
    ckpt = read_compressed(directory)
    layout = str(ckpt.manifest["layout"])
    if layouts is not None and not (layout in layouts or ("N:M" in layouts and nm_pattern(layout) is not None)):
        raise SurgeonError(f"{directory} holds {layout} weights; this backend reads {' or '.join(layouts)}")
    dtype = dtype or DTYPES.get(str(ckpt.manifest.get("dtype")), torch.float32)
    if nm_pattern(layout) is None and device.type == "cpu" and dtype not in (torch.float32, torch.float64):
        raise SurgeonError(f"torch's CPU sparse matmul has no {str(dtype).removeprefix('torch.')} kernel; "
                           "load CSR/BSR checkpoints as float32 on CPU")
    adapter = get_adapter(ckpt.config["model_type"])
    model: Any = ckpt.skeleton  # a transformers PreTrainedModel on the meta device
    linears = {f"{name}.weight": name for name in adapter.decoder_linears(model)}
    outside = [k for k in ckpt.packed if k not in linears]
    if outside:
        raise SurgeonError(f"{directory}: tensor {outside[0]} is packed but is not a decoder linear weight")
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in ckpt.dense.items()}
    for key, packed in ckpt.packed.items():
        name = linears[key]
        if nm_pattern(packed.layout) is not None:
            state[key] = packed.dense().to(dtype)
        else:
            model.set_submodule(name, SparseLinear(packed.sparse().to(dtype), state.pop(f"{name}.bias", None)))
    model.load_state_dict(state, assign=True, strict=False)  # keys and shapes checked by read_compressed
    model.tie_weights()
    materialise_buffers(model)
    left = [k for k, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise SurgeonError(f"{directory}: tensor {left[0]} is missing from the checkpoint")
    model.to(device).eval()
    placements = _place(model, ckpt, linears, device, dtype, prefer, policy)
    lm = LoadedModel(model=model, tokenizer=load_tokenizer(directory), adapter=adapter, path=directory,
                     source=f"{directory} ({layout})")
    return CompressedModel(lm=lm, layout=layout, placements=placements, counts=_count(ckpt))


def _place(model: nn.Module, ckpt: CompressedCheckpoint, linears: dict[str, str], device: torch.device,
           dtype: torch.dtype, prefer: Prefer, policy: Policy) -> dict[str, Dispatch]:
    """Put every packed linear on its kernel; returns the decision per weight key."""
    placements: dict[str, Dispatch] = {}
    timings: dict[tuple[Dispatch, tuple[int, int]], dict[int, tuple[float, float]]] = {}  # one tuning per shape
    for key, packed in ckpt.packed.items():
        if nm_pattern(packed.layout) is None:
            placements[key] = Dispatch(packed.layout, "SparseLinear (torch.sparse.mm)", packed.shape)
            continue
        name = linears[key]
        decision = device_dispatch(device, dtype, packed.shape, prefer)
        if decision.kernel != "dense" and packed.layout != "2:4":  # another N:M: 2:4 kernels only where it is also 2:4
            if not NMPattern().holds(model.get_submodule(name).weight != 0):
                decision = Dispatch("dense", f"{packed.layout} weight is not also 2:4, the only pattern of the "
                                             "sparse kernels", packed.shape)
        if decision.kernel != "dense" and policy == "auto":
            if (decision, packed.shape) not in timings:
                try:
                    timings[decision, packed.shape] = tune(decision, packed.shape, dtype, device)
                except RuntimeError as exc:  # the kernel refused the shape: conversion below says so too
                    log.debug("2:4 tuning of %s failed: %s", packed.shape, exc)
                    timings[decision, packed.shape] = {}
            if timings[decision, packed.shape]:
                decision = tuned(decision, packed.shape, timings[decision, packed.shape])
        if decision.kernel != "dense":
            linear = model.get_submodule(name)
            assert isinstance(linear, nn.Linear), name
            try:
                module = to_semi_structured_linear(linear, decision)
            except RuntimeError as exc:  # a kernel the device turned down: this layer stays dense
                decision = Dispatch("dense", f"conversion failed: {str(exc).strip().splitlines()[0][:160]}", packed.shape)
            else:
                if module is not linear:
                    model.set_submodule(name, module)
        placements[key] = decision
    dense = [d for d in placements.values() if d.kernel == "dense"]
    if nm_pattern(ckpt.manifest["layout"]) is not None and device.type != "cuda":
        log.warning("%s weights loaded dense on %s: semi-structured kernels need a CUDA sm80+ GPU",
                    ckpt.manifest["layout"], device.type)
    elif dense:
        log.warning("2:4 kernels: %s; %d layers fell back to dense (e.g. %s)",
                    dict(Counter(d.kernel for d in placements.values())), len(dense), dense[0].reason)
    switched = [d for d in placements.values() if d.dense_below]
    if switched:
        log.warning("2:4 kernels: %d layers keep a dense copy for calls under %s tokens, where dense was faster "
                    "(backend torch-24-sparse keeps 2:4 weights only)", len(switched),
                    "/".join(str(t) for t in sorted({d.dense_below for d in switched})))
    return placements


def load_packed(spec: str | None, device: str, dtype: str, threads: int | None, *, backend: str) -> PackedBackend:
    """The packed backends (``torch-24``, ``torch-24-sparse``, ``torch-csr``): :func:`load_compressed`
    with the backend's layouts, dtype and 2:4 policy (:data:`BACKEND_LAYOUTS`)."""
    if spec is None:
        raise SurgeonError(f"backend {backend} needs a directory written by `surgeon-export pack`, not the default model")
    target = torch.device(device)
    try:
        compressed = load_compressed(spec, device=target,
                                     dtype=backend_dtype(backend, target) if dtype == "auto" else resolve_dtype(dtype, target),
                                     policy=BACKEND_POLICY.get(backend, "auto"), layouts=BACKEND_LAYOUTS[backend])
    except SurgeonError as exc:
        raise SurgeonError(f"backend {backend} cannot run {spec}: {exc}") from None
    return PackedBackend(compressed, backend)


class PackedBackend(TorchBackend):
    """A compressed checkpoint on torch: ``torch-24`` (2:4 weights as semi-structured sparse tensors in
    float16 on a CUDA sm80+ GPU where measured faster than dense; dense float32 on CPU),
    ``torch-24-sparse`` (2:4 kernels wherever they run, least memory), ``torch-csr`` (CSR/BSR weights
    through ``torch.sparse.mm``, float32)."""

    def __init__(self, compressed: CompressedModel, name: str) -> None:
        super().__init__(compressed.lm.model, compressed.lm.tokenizer, compressed.lm.path, compressed.lm.source)
        self.compressed, self.name = compressed, name

    def describe(self) -> dict:
        return {**self.compressed.describe(), "flops_per_token": flops_table(self.config)}
