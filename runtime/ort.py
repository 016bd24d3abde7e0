"""The ``onnxruntime`` backend: an exported decoder graph with its KV cache bound in place.

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

CPU uses the CPU execution provider; ``cuda`` the CUDA provider (``onnxruntime-gpu``). The backend
runs with as many intra-op threads as torch uses (``--threads``). For ``describe``, parameters,
zeros and bytes are counted in the graph's initializers, and a NaN or infinite one is refused,
naming it (a benchmark loads every model before it measures any, so it stops before measuring);
decoder linears are the initializers ``surgeon_onnx.json`` names.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from base.errors import SurgeonError
from base.formats import ONNX_DATA_FILE, ONNX_FILE, ONNX_MANIFEST_FILE
from base.loading import check_finite, load_tokenizer
from export.flops import flops_table
from runtime.backend import CachedLogits, hf_config, pruning_config

KEEP = "num_logits_to_keep"  # optional input of our graphs: logits of the last k positions only
PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)")
FLOAT_TYPES = (1, 10, 11, 16)  # onnx.TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16
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


class GraphBackend(CachedLogits):
    """What every runtime over an ONNX decoder export shares (``onnxruntime``, ``openvino``).

    One place for the export directory's files (config, tokenizer, ``surgeon_onnx.json``), the
    cache's bookkeeping (``past_key_values.{i}.key/value`` inputs paired with ``present.{i}.*``
    outputs, per-layer shapes, the past dtype), chunked prefill and ``describe``, so a runtime only
    opens the graph, allocates an empty past (``reset``) and runs one pass (``_run``).
    """

    name = "onnx"
    past: list[Any]

    def _open(self, path: str | Path, device: str, prefill_tokens: int, min_chunk: int) -> None:
        """The graph file and the files beside it (config, tokenizer, manifest)."""
        self.prefill_tokens, self.min_chunk = prefill_tokens, min_chunk  # prefill_tokens 0: one pass
        self.path = model_file(path)
        self.directory = self.path.parent  # config.json, generation_config.json and the tokenizer live here
        self.device = torch.device(device)
        self.config: Any = hf_config(self.directory, " beside the graph")
        self.tokenizer = load_tokenizer(self.directory)
        manifest = self.directory / ONNX_MANIFEST_FILE
        self.manifest = json.loads(manifest.read_text()) if manifest.is_file() else None
        self.past = []

    def _pair_cache(self, inputs: dict[str, tuple], outputs: list[str], past_dtype: Any, vocab: Any) -> None:
        """Check the graph's I/O names and record the cache layout.

        ``inputs`` maps each input name to its shape (symbolic axes as anything but an int), ``outputs``
        lists the output names in order; ``past_dtype`` is the past tensors' numpy dtype.
        """
        missing = [n for n in ("input_ids", "attention_mask", "position_ids") if n not in inputs]
        if missing or not outputs or outputs[0] != "logits":
            raise SurgeonError(f"{self.path} is not a decoder graph with KV cache (inputs {sorted(inputs)})")
        past = sorted((int(m[1]), m[2] == "value", name) for name in inputs if (m := PAST.fullmatch(name)))
        self.past_names = [name for _, _, name in past]
        self.present_names = [name.replace("past_key_values.", "present.") for name in self.past_names]
        if not self.past_names or self.present_names != outputs[1:]:
            raise SurgeonError(f"{self.path}: past_key_values inputs and present outputs do not pair up")
        self.past_shapes = [tuple(inputs[n]) for n in self.past_names]  # [batch, kv_heads_i, past, head_dim]
        self.dtype = past_dtype
        self.vocab_size = int(vocab) if isinstance(vocab, int) else int(self.config.vocab_size)

    def empty_shapes(self, batch_size: int) -> list[list[int]]:
        """The past of a fresh cache: ``[B, kv_heads_i, 0, head_dim]`` per input."""
        return [[batch_size, int(shape[1]), 0, int(shape[3])] for shape in self.past_shapes]

    @property
    def num_layers(self) -> int:
        return len(self.past_names) // 2

    def runtime_facts(self) -> dict:
        """What ``describe`` reports about the runtime itself (providers, threads, precision)."""
        return {}

    def describe(self) -> dict:
        import ctypes
        import gc

        import onnx
        from onnx import numpy_helper

        linears = {v["initializer"] for v in (self.manifest or {}).get("decoder_linears", {}).values()}
        if not linears:
            raise SurgeonError(f"{self.directory}: no {ONNX_MANIFEST_FILE} naming the decoder linears; "
                               "re-export with surgeon-export onnx")
        proto = onnx.load(str(self.path))  # with its external data: zeros are counted, not read from a report
        counts = dict.fromkeys(("total", "decoder_linear", "decoder_linear_zeros", "total_zeros"), 0)
        weight_bytes = 0
        for tensor in proto.graph.initializer:
            if tensor.data_type not in FLOAT_TYPES:
                continue  # shapes and other integer constants are not parameters
            array = numpy_helper.to_array(tensor)
            if not np.isfinite(array).all():  # at load, before a benchmark measures any model (names the tensor)
                check_finite([(tensor.name, torch.tensor(array))], self.directory)
            zeros = int((array == 0).sum())
            counts["total"] += array.size
            counts["total_zeros"] += zeros
            weight_bytes += array.nbytes
            if tensor.name in linears:
                counts["decoder_linear"] += array.size
                counts["decoder_linear_zeros"] += zeros
        del proto
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the parsed graph back before memory is measured
        except (OSError, AttributeError):
            pass
        files = [f for f in (self.path, self.directory / ONNX_DATA_FILE) if f.is_file()]
        graph = (self.manifest or {}).get("graph", {})
        return {
            "source": (self.manifest or {}).get("source") or str(self.directory),
            "path": str(self.directory),
            "bytes_on_disk": sum(f.stat().st_size for f in files),
            "weight_bytes": weight_bytes,
            "parameters": counts,
            "sparsity": counts["decoder_linear_zeros"] / counts["decoder_linear"],
            "pruning": pruning_config(self.directory),
            "dtype": np.dtype(self.dtype).name,
            "flops_per_token": flops_table(self.config),
            "onnx": {"opset": graph.get("opset"), "simplified": graph.get("simplified"),
                     "optimized": (self.manifest or {}).get("config", {}).get("optimize"),
                     **self.runtime_facts(), "prefill_tokens_per_pass": self.prefill_tokens},
        }

    def reset(self, batch_size: int) -> None:
        raise NotImplementedError

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
        raise NotImplementedError


class OrtBackend(GraphBackend):
    """:class:`runtime.backend.Backend` over an ONNX decoder graph with KV cache."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None,
                 prefill_tokens: int = PREFILL_TOKENS, min_chunk: int = MIN_CHUNK) -> None:
        import onnxruntime as ort

        self._open(path, device, prefill_tokens, min_chunk)
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
        past = next((i for n, i in inputs.items() if PAST.fullmatch(n)), None)
        self._pair_cache({n: tuple(i.shape) for n, i in inputs.items()}, [o.name for o in self.session.get_outputs()],
                         ELEMENT_TYPES.get(past.type) if past is not None else None,
                         self.session.get_outputs()[0].shape[-1])
        optional = {i.name for i in self.session.get_overridable_initializers()}  # inputs with a default
        # bind_cpu_input refuses inputs that have a default initializer; bind an OrtValue instead.
        self.keep_last = ort.OrtValue.ortvalue_from_numpy(np.array(1, dtype=np.int64)) \
            if KEEP in inputs or KEEP in optional else None
        self.io = self.session.io_binding()
        # After a multi-token pass, hand the arena's free chunks back: without this, one perplexity
        # batch would keep the process at its peak for good. Single-token steps reuse the arena.
        self.shrink = ort.RunOptions()
        self.shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", f"{self.device_type}:{self.device_id}")

    def runtime_facts(self) -> dict:
        return {"providers": self.session.get_providers()}

    def reset(self, batch_size: int) -> None:
        import onnxruntime as ort

        self.past = [ort.OrtValue.ortvalue_from_shape_and_type(shape, self.dtype, self.device_type, self.device_id)
                     for shape in self.empty_shapes(batch_size)]  # [B, kv_heads_i, 0, head_dim] on the device

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


def load_graph(cls: Any, spec: str | None, device: str, dtype: str, threads: int | None) -> GraphBackend:
    """Backend ``cls`` over an export directory of ``surgeon-export onnx``, in the dtype it was exported in."""
    name = cls.name
    if spec is None:
        raise SurgeonError(f"backend {name} needs an ONNX export directory "
                           "(write one with `surgeon-export onnx MODEL --out DIR`), not the default model")
    try:
        backend = cls(spec, device, threads or torch.get_num_threads())
    except SurgeonError as exc:
        raise SurgeonError(f"backend {name} cannot run {spec}: {exc}") from None
    exported = np.dtype(backend.dtype).name  # "float32" or "float16"
    if dtype != "auto" and exported != dtype:
        raise SurgeonError(f"backend {name} runs {spec} in the dtype it was exported in ({exported}), "
                           f"not {dtype}; export with `surgeon-export onnx --dtype`")
    return backend


def load_onnxruntime(spec: str | None, device: str, dtype: str, threads: int | None) -> OrtBackend:
    """The ``onnxruntime`` backend: an export directory of ``surgeon-export onnx``, in the dtype it was exported in."""
    return load_graph(OrtBackend, spec, device, dtype, threads)  # type: ignore[return-value]
