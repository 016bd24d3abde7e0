"""The ONNX Runtime backend of ``runtime.generate``: an exported decoder graph with its KV cache bound in place.

The graph (``export/onnx.py``; any export with optimum's decoder names works) maps ``input_ids``,
``attention_mask``, ``position_ids`` and ``past_key_values.{i}.key/value`` to ``logits`` and
``present.{i}.key/value``. The cache never leaves the execution device: each step's ``present``
outputs are allocated by ONNX Runtime on the device and bound, as the same ``OrtValue`` objects, as
the next step's ``past`` inputs (IO binding), so no key or value is copied to the host or through
numpy between steps. Only the logits come back to the host. (The graph itself appends the new
keys with a ``Concat``; sharing one preallocated buffer between past and present would need
ONNX Runtime's ``GroupQueryAttention`` contrib operator, which this portable graph does not use.)

Long prompts are prefilled through the cache in chunks of about :data:`PREFILL_TOKENS` tokens per
pass (``batch x chunk``, at least :data:`MIN_CHUNK` per row) when only the last logits are wanted
(chunked prefill; the logits are the same). The portable graph's attention materialises every
``T x (P + T)`` score, and ONNX Runtime's CPU softmax is about 3x slower on the masked (underflowing)
entries of a causal block: one 8x512 pass of SmolLM2 took 9.5 s, eight chunks of 64 tokens 7.3 s,
while a single row gains nothing from chunks under 512 tokens.

CPU uses the CPU execution provider; ``cuda`` the CUDA provider (``onnxruntime-gpu``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from surgeon.errors import SurgeonError

ONNX_FILE = "model.onnx"  # as export/onnx.py writes it (runtime does not import export)
KEEP = "num_logits_to_keep"  # optional input of our graphs: logits of the last k positions only
PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)")
ELEMENT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
PREFILL_TOKENS = 512  # batch x chunk tokens per prefill pass when only the last logits are wanted
MIN_CHUNK = 64  # smaller chunks make the linears' matrix products too thin


def model_file(path: str | Path) -> Path:
    """The ``model.onnx`` of an export directory (or a ``.onnx`` file itself), with clear errors."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".onnx":
        return path
    if not path.is_dir():
        raise SurgeonError(f"ONNX model not found: {path}")
    if not (path / ONNX_FILE).is_file():
        raise SurgeonError(f"{path} is not an ONNX export directory (no {ONNX_FILE}; "
                           "write one with `surgeon-export onnx MODEL --out DIR`)")
    return path / ONNX_FILE


def providers_for(device: str) -> tuple[list[str], str, int]:
    """Execution providers, OrtValue device type and device id for ``cpu``, ``cuda`` or ``cuda:N``."""
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"], "cpu", 0
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise SurgeonError(f"--device {device}: this onnxruntime has no CUDA provider (install onnxruntime-gpu)")
        index = int(device.partition(":")[2] or 0)
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"], "cuda", index  # type: ignore[list-item]
    raise SurgeonError(f"unknown device {device!r}; use cpu, cuda or cuda:N")


class OrtDecoder:
    """:class:`runtime.generate.Decoder` over an ONNX decoder graph with KV cache."""

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None,
                 prefill_tokens: int = PREFILL_TOKENS, min_chunk: int = MIN_CHUNK) -> None:
        import onnxruntime as ort

        self.prefill_tokens, self.min_chunk = prefill_tokens, min_chunk  # prefill_tokens 0: one pass
        self.path = model_file(path)
        self.directory = self.path.parent  # config.json, generation_config.json and the tokenizer live here
        providers, self.device_type, self.device_id = providers_for(device)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()  # the project's --threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: the optional num_logits_to_keep input draws a warning
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
            raise SurgeonError(f"ONNX Runtime cannot load {self.path}: {str(exc).strip().splitlines()[0]}") from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        missing = [n for n in ("input_ids", "attention_mask", "position_ids") if n not in inputs]
        if missing or not outputs or outputs[0] != "logits":
            raise SurgeonError(f"{self.path} is not a decoder graph with KV cache (inputs {sorted(inputs)})")
        past = sorted((int(m[1]), m[2] == "value", name) for name in inputs if (m := PAST.fullmatch(name)))
        self.past_names = [name for _, _, name in past]
        self.present_names = [name.replace("past_key_values.", "present.") for name in self.past_names]
        if not self.past_names or self.present_names != outputs[1:]:
            raise SurgeonError(f"{self.path}: past_key_values inputs and present outputs do not pair up")
        self.past_shapes = [tuple(inputs[n].shape) for n in self.past_names]  # [batch, kv_heads_i, past, head_dim]
        self.dtype = ELEMENT_TYPES[inputs[self.past_names[0]].type]
        vocab = self.session.get_outputs()[0].shape[-1]
        self.vocab_size = int(vocab) if isinstance(vocab, int) else -1
        optional = {i.name for i in self.session.get_overridable_initializers()}  # inputs with a default
        # bind_cpu_input refuses inputs that have a default initializer; bind an OrtValue instead.
        self.keep_last = ort.OrtValue.ortvalue_from_numpy(np.array(1, dtype=np.int64)) \
            if KEEP in inputs or KEEP in optional else None
        self.io = self.session.io_binding()
        self.past: list[Any] = []
        # After a multi-token pass, hand the arena's free chunks back: without this, one perplexity
        # batch would keep the process at its peak for good. Single-token steps reuse the arena.
        self.shrink = ort.RunOptions()
        self.shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", f"{self.device_type}:{self.device_id}")

    @property
    def num_layers(self) -> int:
        return len(self.past_names) // 2

    def reset(self, batch_size: int) -> None:
        import onnxruntime as ort

        self.past = [ort.OrtValue.ortvalue_from_shape_and_type(
            [batch_size, shape[1], 0, shape[3]], self.dtype, self.device_type, self.device_id)
            for shape in self.past_shapes]  # [B, kv_heads_i, 0, head_dim] on the device

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, last_only: bool = False) -> Tensor:
        batch, length = input_ids.shape
        chunk = max(self.min_chunk, self.prefill_tokens // batch) if self.prefill_tokens else 0
        if last_only and 0 < chunk < length:  # chunked prefill: same logits, less attention work
            seen = attention_mask.shape[1] - length  # tokens already in the cache
            for lo in range(0, length - chunk, chunk):
                hi = lo + chunk
                self._run(input_ids[:, lo:hi], attention_mask[:, : seen + hi], position_ids[:, lo:hi], True)
            lo = (length - 1) // chunk * chunk
            return self._run(input_ids[:, lo:], attention_mask, position_ids[:, lo:], True)
        return self._run(input_ids, attention_mask, position_ids, last_only)

    def _run(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, last_only: bool) -> Tensor:
        """One pass of the graph over ``input_ids`` ``[B, T]``; the cache advances by ``T``."""
        io = self.io
        # bind_cpu_input keeps a pointer into each array (no copy): they must live until the run ends.
        feeds = {"input_ids": _int64(input_ids), "attention_mask": _int64(attention_mask),
                 "position_ids": _int64(position_ids)}
        for name, array in feeds.items():
            io.bind_cpu_input(name, array)
        if last_only and self.keep_last is not None:  # the LM head then runs on the last position only
            io.bind_ortvalue_input(KEEP, self.keep_last)
        for name, value in zip(self.past_names, self.past):
            io.bind_ortvalue_input(name, value)
        io.bind_output("logits", "cpu")
        for name in self.present_names:
            io.bind_output(name, self.device_type, self.device_id)  # allocated on the device by ORT
        self.session.run_with_iobinding(io, self.shrink if input_ids.shape[1] > 1 else None)
        outputs = io.get_outputs()
        self.past = list(outputs[1:])  # bound as the next step's past: the cache stays where it is
        logits = torch.from_numpy(outputs[0].numpy())  # [B, T or 1, V]
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        return (logits[:, -1:] if last_only else logits).float()


def _int64(t: Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.int64)
