"""One generate loop over any backend that keeps its own KV cache: greedy or sampling, stop tokens, batch.

A backend implements :class:`Decoder` (a small Protocol: ``reset`` and ``forward``); the loop owns
the tokens, the attention mask and the positions, so every backend sees exactly the same inputs.
Prompts of different lengths are left-padded: the mask is 0 on padding, positions count only real
tokens (``cumsum(mask) - 1``), as Hugging Face generation does. Sampling draws from a seeded
``torch.Generator`` after temperature, top-k and top-p (nucleus, Holtzman et al. 2020) filtering,
so two backends with the same logits draw the same tokens.

Backends register a loader by name (:func:`register_loader`); ``torch`` and ``onnxruntime`` are
built in, others (for instance the 2:4 and CSR loaders) add themselves the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from surgeon.errors import SurgeonError


class Decoder(Protocol):
    """A causal LM that keeps the keys and values of every token it has seen since ``reset``."""

    vocab_size: int

    def reset(self, batch_size: int) -> None:
        """Drop the cache; the next ``forward`` starts ``batch_size`` new sequences."""

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, last_only: bool = False) -> Tensor:
        """Run new tokens ``[B, T]`` after the cached ones and cache them; returns float32 logits.

        ``attention_mask`` ``[B, P + T]`` covers cached and new tokens, ``position_ids`` ``[B, T]``;
        all int64 on CPU. Logits are ``[B, T, V]``, or ``[B, 1, V]`` (last position) if ``last_only``.
        """


@dataclass
class GenerationConfig:
    """How to pick tokens and when to stop."""

    max_new_tokens: int = 32
    do_sample: bool = False  # False: greedy (argmax)
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filtering
    top_p: float = 1.0  # 1.0: no nucleus filtering
    stop_tokens: tuple[int, ...] = ()  # a sequence ends after emitting one of these
    pad_token_id: int = 0  # fills prompts on the left and sequences after they stop
    seed: int = 0

    def validate(self) -> None:
        """Refuse impossible settings before anything runs."""
        if self.max_new_tokens < 1:
            raise SurgeonError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise SurgeonError(f"temperature must be positive, got {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise SurgeonError(f"need top_k >= 0 and 0 < top_p <= 1, got {self.top_k} and {self.top_p}")


@dataclass
class Generation:
    """Generated tokens per sequence (stop token included, padding excluded) and timings."""

    tokens: list[list[int]]
    stopped: list[bool]  # ended on a stop token (else: ran out of max_new_tokens)
    prefill_seconds: float
    decode_seconds: float
    steps: int = field(default=0)  # decode steps after the prefill


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Prompts as left-padded ids ``[B, T]`` and mask ``[B, T]`` (int64)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise SurgeonError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def pick(logits: Tensor, cfg: GenerationConfig, generator: torch.Generator) -> Tensor:
    """Next tokens ``[B]`` from last-position logits ``[B, V]``: argmax, or a filtered sample."""
    if not cfg.do_sample:
        return logits.argmax(dim=-1)
    scores = logits.float() / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(scores, min(cfg.top_k, scores.shape[-1]), dim=-1).values[:, -1:]  # [B, 1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > cfg.top_p  # keep the smallest prefix reaching top_p
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.inference_mode()
def generate(decoder: Decoder, prompts: Sequence[Sequence[int]], cfg: GenerationConfig | None = None) -> Generation:
    """Continue every prompt with up to ``cfg.max_new_tokens`` tokens.

    Args:
        decoder: any backend (:class:`Decoder`); its cache is reset first.
        prompts: token ids per sequence, of any lengths (left-padded into one batch).
        cfg: greedy or sampling, stop tokens, seed.

    Example:
        >>> out = generate(load_decoder("onnxruntime", "small-onnx"), [[1, 2, 3]], GenerationConfig())  # doctest: +SKIP
        >>> len(out.tokens[0])  # doctest: +SKIP
        32
    """
    cfg = cfg or GenerationConfig()
    cfg.validate()
    ids, mask = left_pad(prompts, cfg.pad_token_id)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]: real tokens count from 0
    batch = ids.shape[0]
    generator = torch.Generator().manual_seed(cfg.seed)
    stop = torch.tensor(cfg.stop_tokens, dtype=torch.long)
    decoder.reset(batch)
    start = time.perf_counter()
    logits = decoder.forward(ids, mask, positions, last_only=True)[:, -1]  # [B, V]
    prefill = time.perf_counter() - start
    done = torch.zeros(batch, dtype=torch.bool)
    out: list[Tensor] = []
    start = time.perf_counter()
    for step in range(cfg.max_new_tokens):
        token = pick(logits, cfg, generator).cpu()  # [B]
        token = torch.where(done, torch.full_like(token, cfg.pad_token_id), token)
        out.append(token)
        if len(stop):
            done |= torch.isin(token, stop)
        if bool(done.all()) or step == cfg.max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], dim=1)  # [B, P + 1]
        positions = positions[:, -1:] + 1  # [B, 1]
        logits = decoder.forward(token[:, None], mask, positions, last_only=True)[:, -1]
    decode = time.perf_counter() - start
    tokens = torch.stack(out, dim=1)  # [B, N]
    rows: list[list[int]] = []
    stopped: list[bool] = []
    for row in tokens.tolist():
        ends = [i for i, t in enumerate(row) if t in cfg.stop_tokens]
        rows.append(row[: ends[0] + 1] if ends else row)
        stopped.append(bool(ends))
    return Generation(rows, stopped, prefill, decode, steps=len(out) - 1)


DecoderLoader = Callable[[str, str, int | None], Decoder]  # (model path, device, threads) -> Decoder
LOADERS: dict[str, DecoderLoader] = {}


def register_loader(name: str, loader: DecoderLoader) -> None:
    """Make a backend available to :func:`load_decoder` (and ``surgeon-export generate --backend``)."""
    LOADERS[name] = loader


def load_decoder(backend: str, path: str, device: str = "cpu", threads: int | None = None) -> Decoder:
    """A :class:`Decoder` for the model at ``path`` on ``backend`` (``torch``, ``onnxruntime``, ...)."""
    if backend not in LOADERS:
        raise SurgeonError(f"unknown runtime backend {backend!r}; available: {', '.join(sorted(LOADERS))}")
    return LOADERS[backend](path, device, threads)


def _load_torch(path: str, device: str, threads: int | None) -> Decoder:
    from runtime.torch_backend import TorchDecoder

    return TorchDecoder.load(path, device, threads)


def _load_onnxruntime(path: str, device: str, threads: int | None) -> Decoder:
    from runtime.ort import OrtDecoder

    return OrtDecoder(path, device, threads)


register_loader("torch", _load_torch)
register_loader("onnxruntime", _load_onnxruntime)
