"""The ``openvino`` backend: our ONNX decoder export compiled by OpenVINO for the CPU.

OpenVINO reads the export's ``model.onnx`` directly (its ONNX frontend; no conversion step, no
files written). The cache bookkeeping, chunked prefill and ``describe`` are the ones the
``onnxruntime`` backend uses (:class:`runtime.ort.GraphBackend`): the same ``past_key_values.{i}.*``
inputs paired with ``present.{i}.*`` outputs, one shape per layer, so per-layer KV head counts
work as they do there.

Two details differ from ONNX Runtime:

- OpenVINO folds an input that has an initializer into a constant, so the optional
  ``num_logits_to_keep`` input would always be 0 (the LM head on every position). It is turned
  back into a parameter before compiling, and fed 0 or 1 on every pass.
- The cache never goes through numpy: two inference requests take turns, each reading the other's
  ``present`` tensors as its ``past`` (shared memory, no copy). A request's outputs are only
  rewritten by its own next run, by which time the other request has consumed them.

Compiled for the ``CPU`` device with ``INFERENCE_NUM_THREADS`` set to the project's ``--threads``,
one stream, the latency hint, and ``INFERENCE_PRECISION_HINT`` set to the precision the export was
asked for (f32 for a float32 export, f16 for a float16 one): on CPUs with bf16 units (AVX512-BF16,
AMX) OpenVINO would otherwise compute a float32 model in bf16 by default (issue #32: logits off by ~1.8 on the
default model through optimum-intel). The precision the compiled model reports it runs in is
recorded in ``describe()`` (``onnx.precision``), so a bench JSON says what was measured; a CPU
without f16 units may run an f16 request in f32, and the record then says f32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from base.errors import SurgeonError
from runtime.ort import KEEP, MIN_CHUNK, PAST, GraphBackend, _int64, load_graph

VERSION = "2026.4.1"  # the pinned release (pyproject's openvino extra, constraints.txt)
INSTALL = f"pip install 'surgeon-export[openvino]' (or: pip install openvino=={VERSION})"
PREFILL_TOKENS = 0  # one pass per prompt; chunks vs one pass is not measured yet (benchmarks/openvino_chunks.py)
PRECISION = {"float32": "f32", "float16": "f16"}  # the export's dtype -> OpenVINO's INFERENCE_PRECISION_HINT


def import_openvino() -> Any:
    """The ``openvino`` module, or a one-line SurgeonError that gives the install line."""
    try:
        import openvino
    except ImportError:
        raise SurgeonError(f"backend openvino needs the openvino package: {INSTALL}") from None
    return openvino


class OpenVinoBackend(GraphBackend):
    """:class:`runtime.backend.Backend` over an ONNX decoder export, compiled by OpenVINO for the CPU."""

    name = "openvino"

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None,
                 prefill_tokens: int = PREFILL_TOKENS, min_chunk: int = MIN_CHUNK) -> None:
        ov = import_openvino()
        if device != "cpu":
            raise SurgeonError(f"--device {device}: backend openvino runs on the CPU only")
        self._open(path, device, prefill_tokens, min_chunk)
        self.threads = threads or torch.get_num_threads()
        core = ov.Core()
        try:
            model = core.read_model(str(self.path))
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own for unreadable models
            raise SurgeonError(f"OpenVINO cannot read {self.path}: {str(exc).strip().splitlines()[0]}") from None
        self.has_keep = _keep_as_parameter(ov, model)
        names = {_name(port): port for port in model.inputs}
        shapes = {name: tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
                  for name, port in names.items()}
        outputs = [_name(port) for port in model.outputs]
        past = next((port for name, port in names.items() if PAST.fullmatch(name)), None)
        dtype = None if past is None else {"f32": np.float32, "f16": np.float16}.get(past.get_element_type().get_type_name())
        logits = model.outputs[0].get_partial_shape()[-1] if model.outputs else None
        self._pair_cache(shapes, outputs, dtype, logits.get_length() if logits is not None and logits.is_static else None)
        asked = PRECISION[np.dtype(self.dtype or np.float32).name]  # never OpenVINO's own default (bf16 on some CPUs)
        self.properties = {"INFERENCE_NUM_THREADS": self.threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
                           "INFERENCE_PRECISION_HINT": asked}
        self.compiled = core.compile_model(model, "CPU", self.properties)
        self.requests = [self.compiled.create_infer_request() for _ in range(2)]  # they take turns (module docstring)
        self.turn = 0
        self.version = ov.get_version()
        self._ov = ov

    def runtime_facts(self) -> dict:
        """The compiled model's properties as it reports them; ``precision``: what it computes in."""
        properties = {k: _text(self.compiled.get_property(k)) for k in self.properties}
        return {"openvino": self.version, "device": "CPU", "precision": properties["INFERENCE_PRECISION_HINT"],
                "precision_asked": self.properties["INFERENCE_PRECISION_HINT"], "properties": properties}

    def reset(self, batch_size: int) -> None:
        self.past = [self._ov.Tensor(np.zeros(shape, dtype=self.dtype)) for shape in self.empty_shapes(batch_size)]

    def _run(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, last_only: bool) -> Tensor:
        """One pass of the graph over ``input_ids`` ``[B, T]``; the cache advances by ``T``."""
        request = self.requests[self.turn]
        feeds = {"input_ids": _int64(input_ids), "attention_mask": _int64(attention_mask),
                 "position_ids": _int64(position_ids)}
        if self.has_keep:  # 1: the LM head runs on the last position only; 0: on every position
            feeds[KEEP] = np.array(1 if last_only else 0, dtype=np.int64)
        for name, array in feeds.items():
            request.set_tensor(name, self._ov.Tensor(array, shared_memory=True))
        for name, tensor in zip(self.past_names, self.past):
            request.set_tensor(name, tensor)  # the other request's present output, not a copy
        request.infer()
        self.past = [request.get_tensor(name) for name in self.present_names]
        self.turn ^= 1
        logits = torch.from_numpy(request.get_tensor("logits").data.copy())  # [B, T or 1, V]
        return (logits[:, -1:] if last_only else logits).float()


def _text(value: Any) -> str:
    """A compiled property as text (``f32``, not ``<Type: 'float32'>``)."""
    return value.to_string() if hasattr(value, "to_string") else str(value)


def _name(port: Any) -> str:
    """The optimum name of a graph input or output (OpenVINO keeps every name a tensor had)."""
    names = port.get_names()
    wanted = [n for n in names if n in ("input_ids", "attention_mask", "position_ids", "logits", KEEP)
              or PAST.fullmatch(n) or n.startswith("present.")]
    return wanted[0] if wanted else port.get_any_name()


def _keep_as_parameter(ov: Any, model: Any) -> bool:
    """Turn the ``num_logits_to_keep`` constant (an input with a default) back into an input.

    Returns whether the graph has it (exports by other tools may not).
    """
    from openvino import opset13

    if any(KEEP in port.get_names() for port in model.inputs):
        return True
    constant = next((op for op in model.get_ordered_ops()
                     if op.get_type_name() == "Constant" and KEEP in op.output(0).get_names()), None)
    if constant is None:
        return False
    parameter = opset13.parameter([], ov.Type.i64, name=KEEP)
    parameter.output(0).set_names({KEEP})
    constant.output(0).replace(parameter.output(0))
    model.add_parameters([parameter])
    model.validate_nodes_and_infer_types()
    return True


def load_openvino(spec: str | None, device: str, dtype: str, threads: int | None) -> OpenVinoBackend:
    """The ``openvino`` backend: an export directory of ``surgeon-export onnx``, in the dtype it was exported in."""
    import_openvino()  # the install line before anything else
    return load_graph(OpenVinoBackend, spec, device, dtype, threads)  # type: ignore[return-value]
