"""The eager PyTorch backend of ``runtime.generate``: a Hugging Face causal LM with its ``DynamicCache``.

The cache object lives here between calls and transformers appends each step's keys and values to
it in place; this is the reference every other backend is compared with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


class TorchDecoder:
    """:class:`runtime.generate.Decoder` over an eager causal LM (any supported family)."""

    def __init__(self, model: nn.Module, tokenizer: Any = None, directory: Path | None = None) -> None:
        self.model = model.eval()
        self.tokenizer, self.directory = tokenizer, directory  # for callers that encode text
        config: Any = model.config
        self.vocab_size = int(config.vocab_size)
        self.device = next(model.parameters()).device
        self.cache: Any = None

    @classmethod
    def load(cls, path: str, device: str = "cpu", threads: int | None = None) -> TorchDecoder:
        """Load through the project's one loader (a directory, a ``.gguf`` file or ``default``)."""
        from surgeon.loading import load_model

        if threads is not None:
            torch.set_num_threads(threads)
        lm = load_model(path, device=device)
        return cls(lm.model, lm.tokenizer, lm.path)

    def reset(self, batch_size: int) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)

    @torch.inference_mode()
    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, last_only: bool = False) -> Tensor:
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                         position_ids=position_ids.to(self.device), past_key_values=self.cache, use_cache=True,
                         logits_to_keep=1 if last_only else 0)
        self.cache = out.past_key_values
        return out.logits.float()  # [B, T or 1, V]
