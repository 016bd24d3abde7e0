"""Perplexity exactly as BENCHMARK_PROTOCOL.md defines it.

Non-overlapping windows of ``seq_len`` tokens cut from the start of the token stream (a partial
last window is dropped); perplexity is ``exp(mean next-token NLL)`` over every predicted token of
those windows (``seq_len - 1`` per window), in float32, eval mode, no gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from base.data import with_bos
from base.errors import SurgeonError


@dataclass
class Perplexity:
    perplexity: float
    nll: float  # mean next-token negative log-likelihood (nats)
    tokens: int  # predicted tokens
    windows: int
    seq_len: int
    bos: bool = False  # each window was BOS then seq_len - 1 text tokens (the tokenizer's convention)

    def to_dict(self) -> dict:
        return asdict(self)


def eval_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None, bos: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``[W, seq_len]`` from the start of ``ids`` (first ``max_windows``); with ``bos``,
    BOS then ``seq_len - 1`` text tokens each."""
    if bos is not None:
        return with_bos(eval_windows(ids, seq_len - 1, max_windows), bos)
    available = ids.numel() // seq_len
    if available == 0:
        raise SurgeonError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    count = available if max_windows is None else min(max_windows, available)
    return ids[: count * seq_len].reshape(count, seq_len)


@torch.inference_mode()
def perplexity(
    model: nn.Module | Scorer,
    ids: torch.Tensor,
    *,
    seq_len: int = 512,
    max_windows: int | None = 64,
    batch_size: int = 4,
    progress: bool = True,
    bos: int | None = None,
) -> Perplexity:
    """Perplexity of ``model`` on the token stream ``ids`` ``[N]``.

    Args:
        model: a Hugging Face causal LM, or anything with ``logits(input_ids) -> [B, T, V]`` (every
            runtime backend, :class:`runtime.backend.Backend`); one that also has
            ``token_logprobs(input_ids) -> [B, T - 1]`` (each token's log-probability) is scored by it.
        ids: token ids ``[N]`` (long) of the whole evaluation text.
        max_windows: evaluate the first this many windows; ``None`` for all (``--full``).
        batch_size: windows per forward pass; changes speed and memory, not the result.
        bos: lead every window with this BOS id (``seq_len - 1`` text tokens each), as
            :func:`base.data.leading_bos` says the tokenizer does; None: the protocol's plain windows.

    Example:
        >>> perplexity(model, ids, max_windows=2).perplexity  # doctest: +SKIP
    """
    windows = eval_windows(ids, seq_len, max_windows, bos)
    logits_of = _hf_logits(model) if isinstance(model, nn.Module) else model.logits
    token_logprobs = getattr(model, "token_logprobs", None)  # a runtime that scores tokens itself (vLLM)
    total_nll = 0.0  # accumulated in Python float (double precision) over all windows
    total_tokens = 0
    bar = tqdm(total=windows.shape[0], desc="perplexity", unit="win", disable=not progress, leave=False)
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size]  # [B, T]
        if token_logprobs is not None:
            nll = -token_logprobs(batch).sum()  # [B, T - 1] log p(token | tokens before it)
        else:
            logits = logits_of(batch).float()  # [B, T, V]
            targets = batch[:, 1:].to(logits.device)
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        if not torch.isfinite(nll):
            raise FloatingPointError("non-finite loss during perplexity evaluation")
        total_nll += float(nll)
        total_tokens += batch[:, 1:].numel()
        bar.update(batch.shape[0])
    bar.close()
    mean = total_nll / total_tokens
    return Perplexity(math.exp(mean), mean, total_tokens, windows.shape[0], seq_len, bos is not None)


class Scorer(Protocol):
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor: ...


def _hf_logits(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    model.eval()
    device = next(model.parameters()).device
    return lambda batch: model(input_ids=batch.to(device), use_cache=False).logits
