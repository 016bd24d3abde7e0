"""The eager PyTorch backend: a Hugging Face causal LM with its ``DynamicCache``.

The cache object lives here between calls and transformers appends each step's keys and values to
it in place; this is the reference every other backend is compared with. The packed backends
(``torch-24``, ``torch-csr``, :mod:`runtime.load`) are this backend over a model built from a
compressed checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from base.adapters import get_adapter
from base.formats import dtype_name
from base.loading import LoadedModel, count_parameters, load_model
from export.flops import flops_table
from runtime.backend import pruning_config, resolve_dtype


class TorchBackend:
    """:class:`runtime.backend.Backend` over an eager causal LM (any supported family)."""

    name = "torch"

    def __init__(self, model: nn.Module, tokenizer: Any = None, directory: Path | None = None,
                 source: str | None = None) -> None:
        self.model = model.eval()
        self.tokenizer, self.directory, self.source = tokenizer, directory, source or str(directory)
        self.config: Any = self.model.config
        self.vocab_size = int(self.config.vocab_size)
        self.device = next(self.model.parameters()).device
        self.cache: Any = None

    @classmethod
    def of(cls, lm: LoadedModel) -> TorchBackend:
        """The backend over a model loaded by :func:`base.loading.load_model`."""
        return cls(lm.model, lm.tokenizer, lm.path, lm.source)

    def reset(self, batch_size: int) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.config)

    @torch.inference_mode()
    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, last_only: bool = False) -> Tensor:
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                         position_ids=position_ids.to(self.device), past_key_values=self.cache, use_cache=True,
                         logits_to_keep=1 if last_only else 0)
        self.cache = out.past_key_values
        return out.logits.float()  # [B, T or 1, V]

    @torch.inference_mode()
    def logits(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids=input_ids.to(self.device), use_cache=False).logits.float()  # [B, T, V]

    def describe(self) -> dict:
        counts = count_parameters(self.model, get_adapter(self.config.model_type))
        unique = {p.data_ptr(): p for p in self.model.parameters()}.values()  # tied weights once
        return {
            "source": self.source,
            "path": str(self.directory),
            "bytes_on_disk": sum(f.stat().st_size for f in Path(self.directory).glob("*.safetensors")),
            "weight_bytes": sum(p.numel() * p.element_size() for p in unique),
            "parameters": {**counts, "total_zeros": sum(int((p == 0).sum()) for p in unique)},
            "sparsity": counts["decoder_linear_zeros"] / counts["decoder_linear"],
            "pruning": pruning_config(self.directory),
            "dtype": dtype_name(next(iter(unique)).dtype),
            "flops_per_token": flops_table(self.config),
        }


def load_torch(spec: str | None, device: str, dtype: str, threads: int | None) -> TorchBackend:
    """The ``torch`` backend: a model directory, a ``.gguf`` file or the default model (None)."""
    from base.errors import SurgeonError

    try:
        lm = load_model(spec, device=device, dtype=resolve_dtype(dtype, device))
    except SurgeonError as exc:
        raise SurgeonError(f"backend torch cannot run {spec or 'the default model'}: {exc}") from None
    return TorchBackend.of(lm)

