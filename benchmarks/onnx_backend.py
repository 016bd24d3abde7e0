"""The ``onnxruntime`` benchmark backend: an ONNX export directory measured like the torch backend.

``surgeon-export bench dense=default ort=onnx-dir --backend torch --backend onnxruntime`` compares
eager torch with ONNX Runtime in one run. The model is an export of ``surgeon-export onnx``; it
runs through :class:`runtime.ort.OrtDecoder` (KV cache bound in place with IO binding) with as
many intra-op threads as torch uses in the worker (``--threads``). The cells mean what they mean
for torch (docs/benchmarks.md): prefill turns a prompt into last-position logits only (the graph's
``num_logits_to_keep`` input; long prompts go through the cache in chunks of about 512 tokens per
pass, see ``runtime/ort.py``), decode is an untimed prefill then greedy steps. Parameters,
zeros and bytes are counted in the graph's initializers; decoder linears are the initializers
``surgeon_onnx.json`` names.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from benchmarks import latency
from benchmarks.backends import PRUNING_REPORT
from surgeon.errors import SurgeonError

MANIFEST_FILE = "surgeon_onnx.json"  # written by export/onnx.py beside the graph
FLOAT_TYPES = (1, 10, 11, 16)  # onnx.TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16


class _AsCausalLM(nn.Module):
    """Just enough of a Hugging Face causal LM for :func:`benchmarks.metrics.perplexity`."""

    def __init__(self, decoder: Any, config: Any) -> None:
        super().__init__()
        self.decoder, self.config = decoder, config
        self.anchor = nn.Parameter(torch.empty(0), requires_grad=False)  # tells perplexity the device: CPU

    def forward(self, input_ids: Tensor, use_cache: bool = False) -> SimpleNamespace:  # noqa: ARG002
        batch, length = input_ids.shape
        self.decoder.reset(batch)
        mask = torch.ones(batch, length, dtype=torch.long)
        positions = torch.arange(length).expand(batch, length)  # [B, T]
        return SimpleNamespace(logits=self.decoder.forward(input_ids, mask, positions))


class OrtRunner:
    """An ONNX export on ONNX Runtime (CPU provider, or CUDA with ``--device cuda``)."""

    def __init__(self, spec: str | None, device: str) -> None:
        from transformers import AutoConfig

        import surgeon  # noqa: F401  (registers the surgeon_* configs of per-layer-shape exports)
        from runtime.ort import OrtDecoder
        from surgeon.loading import quiet_transformers

        if spec is None:
            raise SurgeonError("backend onnxruntime needs an ONNX export directory "
                               "(write one with `surgeon-export onnx MODEL --out DIR`), not the default model")
        self.device = torch.device(device)
        try:
            self.decoder = OrtDecoder(spec, device, torch.get_num_threads())
        except SurgeonError as exc:
            raise SurgeonError(f"backend onnxruntime cannot run {spec}: {exc}") from None
        self.directory = self.decoder.path.parent
        with quiet_transformers():
            try:
                self.config: Any = AutoConfig.from_pretrained(self.directory, local_files_only=True)
            except (OSError, ValueError) as exc:
                raise SurgeonError(f"{self.directory}: no usable config.json beside the graph ({exc})") from None
        manifest = self.directory / MANIFEST_FILE
        self.manifest = json.loads(manifest.read_text()) if manifest.is_file() else None
        self._prompts: dict[tuple[int, int, int], Tensor] = {}

    def describe(self) -> dict:
        import ctypes
        import gc

        import onnx
        from onnx import numpy_helper

        linears = {v["initializer"] for v in (self.manifest or {}).get("decoder_linears", {}).values()}
        if not linears:
            raise SurgeonError(f"{self.directory}: no {MANIFEST_FILE} naming the decoder linears; re-export with surgeon-export onnx")
        proto = onnx.load(str(self.decoder.path))  # with its external data: zeros are counted, not read from a report
        counts = dict.fromkeys(("total", "decoder_linear", "decoder_linear_zeros", "total_zeros"), 0)
        weight_bytes = 0
        for tensor in proto.graph.initializer:
            if tensor.data_type not in FLOAT_TYPES:
                continue  # shapes and other integer constants are not parameters
            array = numpy_helper.to_array(tensor)
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
        report = self.directory / PRUNING_REPORT
        files = [f for f in (self.decoder.path, self.directory / "model.onnx_data") if f.is_file()]
        graph = (self.manifest or {}).get("graph", {})
        return {
            "source": (self.manifest or {}).get("source") or str(self.directory),
            "path": str(self.directory),
            "bytes_on_disk": sum(f.stat().st_size for f in files),
            "weight_bytes": weight_bytes,
            "parameters": counts,
            "sparsity": counts["decoder_linear_zeros"] / counts["decoder_linear"],
            "pruning": json.loads(report.read_text()).get("config") if report.is_file() else None,
            "dtype": np.dtype(self.decoder.dtype).name,
            "onnx": {"opset": graph.get("opset"), "simplified": graph.get("simplified"),
                     "optimized": (self.manifest or {}).get("config", {}).get("optimize"),
                     "providers": self.decoder.session.get_providers(),
                     "prefill_tokens_per_pass": self.decoder.prefill_tokens},
        }

    def check(self, batch: int, length: int) -> str | None:
        return latency.cell_problem(self.config, self.device, batch, length)

    def perplexity(self, windows: int | None, seq_len: int, batch_size: int, text: str | None,
                   data_dir: str | None, progress: bool) -> dict:
        from transformers import AutoTokenizer

        from benchmarks.metrics import perplexity
        from surgeon.data import check_window, eval_tokens

        model = _AsCausalLM(self.decoder, self.config)
        check_window(seq_len, model)
        tokenizer = AutoTokenizer.from_pretrained(self.directory, local_files_only=True)
        tokens = eval_tokens(tokenizer, text, data_dir)
        result = perplexity(model, tokens.ids, seq_len=seq_len, max_windows=windows,
                            batch_size=batch_size, progress=progress)
        return {**result.to_dict(), "text": tokens.origin}

    def _prompt(self, batch: int, length: int, seed: int) -> Tensor:
        key = (batch, length, seed)
        if key not in self._prompts:
            self._prompts = {key: latency.synthetic_prompt(batch, length, self.config.vocab_size, seed)}
        return self._prompts[key]

    def _prefill(self, prompt: Tensor) -> Tensor:
        batch, length = prompt.shape
        self.decoder.reset(batch)
        mask = torch.ones(batch, length, dtype=torch.long)
        return self.decoder.forward(prompt, mask, torch.arange(length).expand(batch, length), last_only=True)

    def prefill(self, batch: int, length: int, seed: int) -> float:
        prompt = self._prompt(batch, length, seed)
        watch = latency.Stopwatch(self.device)
        watch.start()
        self._prefill(prompt)  # logits come back to the host: the clock stops after the device finished
        return watch.stop()

    def decode(self, batch: int, length: int, new_tokens: int, seed: int) -> float:
        return greedy_decode(self, self._prompt(batch, length, seed), new_tokens)[1]


def greedy_decode(runner: OrtRunner, prompt: Tensor, new_tokens: int) -> tuple[Tensor, float]:
    """As :func:`benchmarks.latency.greedy_decode`: ``[B, new_tokens]`` tokens fed to the timed steps, seconds."""
    batch, length = prompt.shape
    token = runner._prefill(prompt)[:, -1].argmax(dim=-1, keepdim=True)  # [B, 1]
    mask = torch.ones(batch, length + new_tokens, dtype=torch.long)
    fed = []
    watch = latency.Stopwatch(runner.device)
    watch.start()
    for step in range(new_tokens):
        fed.append(token)
        position = torch.full((batch, 1), length + step, dtype=torch.long)
        logits = runner.decoder.forward(token, mask[:, : length + step + 1], position, last_only=True)
        token = logits[:, -1].argmax(dim=-1, keepdim=True)  # [B, 1]
    return torch.cat(fed, dim=1), watch.stop()
