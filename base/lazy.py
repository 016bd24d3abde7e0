"""A model whose weights stay on disk until a layer needs them: the reading side of streamed pruning.

:func:`open_lazy` builds the model ``config.json`` describes on the meta device (no memory), reads
the tensors outside the decoder layers (embeddings, final norm, LM head when untied) and leaves
every decoder layer on meta. :meth:`LazyModel.materialise` reads one layer's tensors from the
memory-mapped safetensors files (``safe_open``: one tensor at a time) and :meth:`LazyModel.release`
sends the layer back to meta, so at most the layers being worked on occupy memory. The same checks
as :func:`base.loading.load_model` run first: safetensors only, every file's header against its
size, per-layer checkpoints against their config; a tensor that cannot be read is named.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from base.adapters import Adapter
from base.env import trim_heap
from base.errors import SurgeonError
from base.loading import (
    check_checkpoint,
    check_finite,
    check_shapes,
    config_errors,
    error_reason,
    load_tokenizer,
    quiet_transformers,
    resolve_model_dir,
)


class LazyWeights:
    """The tensors of a checkpoint's safetensors files, read one at a time by name.

    Each read opens its file, copies the one tensor out and closes it again: a memory map kept open
    would count every page read so far in the process's resident memory, the whole checkpoint by
    the last layer.
    """

    def __init__(self, files: list[Path]) -> None:
        from safetensors import safe_open

        self.where: dict[str, Path] = {}
        self.dtypes: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    self.where[key] = f
                    self.dtypes[key] = handle.get_slice(key).get_dtype()
                    self.shapes[key] = tuple(handle.get_slice(key).get_shape())

    def get(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Tensor ``name`` as a fresh copy in ``dtype`` (never a view of the file)."""
        from safetensors import safe_open

        if name not in self.where:
            raise SurgeonError(f"tensor {name} is missing from the checkpoint")
        try:
            with safe_open(str(self.where[name]), framework="pt") as handle:
                tensor = handle.get_tensor(name).to(dtype=dtype, copy=True)
        except Exception as exc:  # safetensors raises its own types for short or damaged data
            raise SurgeonError(f"cannot read tensor {name} from {self.where[name]}: {exc}") from None
        check_finite([(name, tensor)], self.where[name].parent)
        return tensor

    def nbytes(self, dtype: torch.dtype) -> int:
        """Bytes of every stored tensor in ``dtype``."""
        return dtype.itemsize * sum(math.prod(shape) for shape in self.shapes.values())

    def dtype(self) -> torch.dtype:
        """The floating dtype the checkpoint stores (of its first floating tensor)."""
        names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
        return next((names[d] for d in self.dtypes.values() if d in names), torch.float32)


@dataclass
class LazyModel:
    """A causal LM on the meta device except for what lies outside its decoder layers."""

    model: nn.Module
    tokenizer: Any
    adapter: Adapter
    path: Path
    source: str
    weights: LazyWeights
    dtype: torch.dtype  # the compute dtype layers are materialised in

    def layer_prefix(self, index: int) -> str:
        return f"{self.adapter.layers}.{index}."

    def num_layers(self) -> int:
        return len(self.adapter.decoder_layers(self.model))

    def read_layer(self, index: int) -> nn.Module:
        """Layer ``index`` with its weights read from disk (a fresh module; the model's stays on meta)."""
        import copy

        layer = copy.deepcopy(self.adapter.decoder_layers(self.model)[index])  # on meta: no memory
        prefix = self.layer_prefix(index)
        state = {k: self.weights.get(prefix + k, self.dtype) for k in layer.state_dict()}
        layer.load_state_dict(state, assign=True, strict=True)
        materialise_buffers(self.model, layer)
        return layer.eval()

    def materialise(self, index: int) -> nn.Module:
        """Read layer ``index`` into the model itself and return it."""
        layer = self.read_layer(index)
        self.adapter.decoder_layers(self.model)[index] = layer
        return layer

    def release(self, index: int) -> None:
        """Send layer ``index`` back to the meta device (its memory is freed, and returned to the system)."""
        self.adapter.decoder_layers(self.model)[index].to("meta")
        trim_heap()

    def release_embeddings(self) -> None:
        """Send the input embeddings (and an LM head tied to them) to the meta device: once the first
        layer's inputs are taken, a layer-wise method never runs them again (113 MB of float32 for
        the default model, 0.5 GB for Llama-2-7B); a streamed checkpoint copies them from the source."""
        self.model.get_input_embeddings().to("meta")
        trim_heap()


def materialise_buffers(model: nn.Module, module: nn.Module | None = None) -> None:
    """Compute the non-persistent buffers of ``module`` (default: the whole model) still on meta, such as
    the rotary ``inv_freq``, with the model's own initialiser (as transformers does after a meta load)."""
    for sub in (module if module is not None else model).modules():
        meta = [n for n in sub._non_persistent_buffers_set if getattr(sub, n) is not None and getattr(sub, n).is_meta]
        for name in meta:
            setattr(sub, name, torch.empty_like(getattr(sub, name), device="cpu"))
        if meta:
            # The initialiser also (re)initialises the module's own parameters: Gemma's scaled embedding
            # computes its embed_scale buffer there and would draw random embeddings over the loaded ones.
            # It sees meta stand-ins (initialising them is free and lost); the loaded weights stay.
            params = dict(sub._parameters)
            for name, p in params.items():
                if p is not None:
                    sub._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
            try:
                model._init_weights(sub)  # type: ignore[operator]
            finally:
                sub._parameters.update(params)


def open_lazy(spec: str | Path | None = None, *, dtype: torch.dtype = torch.float32, head: bool = True) -> LazyModel:
    """The model at ``spec`` (directory, ``.gguf`` or the default model) with its decoder layers left on disk.

    ``head=False``: an untied LM head stays on disk too (the layer-wise methods never compute logits;
    a streamed checkpoint copies it from the source): 0.5 GB of float32 for Llama-2-7B, 2.1 GB for a
    128k vocabulary at width 4096.

    Example:
        >>> lazy = open_lazy("Llama-2-7b")  # doctest: +SKIP
        >>> layer = lazy.materialise(0); ...; lazy.release(0)  # doctest: +SKIP
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    directory, source = resolve_model_dir(spec)
    _, adapter, files = check_checkpoint(directory)
    with quiet_transformers():
        try:
            parsed = AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(parsed, trust_remote_code=False, dtype=dtype)
        except config_errors() as exc:  # a config transformers cannot build a model from (tests/test_fuzz.py)
            raise SurgeonError(f"cannot load the config of {directory}: {error_reason(exc)}") from None
    weights = LazyWeights(files)
    check_shapes(directory, model, weights.shapes)  # before any layer is read: never a half-loaded or cut-down model
    lazy = LazyModel(model.eval(), load_tokenizer(directory), adapter, directory, source, weights, dtype)
    layers = adapter.layers + "."
    left = set()  # an untied LM head the caller does not need
    output = model.get_output_embeddings()
    if not head and output is not None and not getattr(model.config, "tie_word_embeddings", False):
        left = {name for name, p in model.named_parameters() if p is output.weight}
    state = {key: weights.get(key, dtype) for key in model.state_dict()
             if not key.startswith(layers) and key not in left and key in weights.where}
    model.load_state_dict(state, assign=True, strict=False)
    model.tie_weights()
    materialise_buffers(model)  # the rotary inv_freq; decoder layers hold no such buffers
    return lazy
