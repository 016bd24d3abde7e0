"""The one decode loop, over any backend (:class:`runtime.backend.Backend`): greedy or sampling, stop tokens, batch.

The backend keeps its own KV cache (``reset`` and ``forward``); the loop owns
the tokens, the attention mask and the positions, so every backend sees exactly the same inputs.
Prompts of different lengths are left-padded: the mask is 0 on padding, positions count only real
tokens (``cumsum(mask) - 1``), as Hugging Face generation does. Sampling draws from a seeded
``torch.Generator`` after temperature, top-k and top-p (nucleus, Holtzman et al. 2020) filtering,
so two backends with the same logits draw the same tokens. Prefill and decode are timed apart
(:class:`Stopwatch`: CUDA events on GPU), so the benchmark runner times decode with this same loop.
A backend that schedules its own requests (``vllm``: continuous batching) has a ``generate`` method
taking the same prompts and config; the loop hands them to it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from base.errors import SurgeonError
from runtime.backend import Backend


class Stopwatch:
    """Wall time of a region: CUDA events on GPU (after synchronising), ``perf_counter`` on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = torch.device(device).type == "cuda"

    def start(self) -> None:
        """Mark the start, after all queued GPU work has finished."""
        if self.cuda:
            torch.cuda.synchronize()
            self._event = torch.cuda.Event(enable_timing=True)
            self._event.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> float:
        """Seconds since :meth:`start`, after all queued GPU work has finished."""
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            torch.cuda.synchronize()
            return self._event.elapsed_time(end) / 1000.0
        return time.perf_counter() - self._t0


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
def generate(decoder: Backend, prompts: Sequence[Sequence[int]], cfg: GenerationConfig | None = None) -> Generation:
    """Continue every prompt with up to ``cfg.max_new_tokens`` tokens.

    Args:
        decoder: any backend (:class:`runtime.backend.Backend`); its cache is reset first.
        prompts: token ids per sequence, of any lengths (left-padded into one batch).
        cfg: greedy or sampling, stop tokens, seed.

    Example:
        >>> out = generate(load_backend("onnxruntime", "small-onnx"), [[1, 2, 3]], GenerationConfig())  # doctest: +SKIP
        >>> len(out.tokens[0])  # doctest: +SKIP
        32
    """
    cfg = cfg or GenerationConfig()
    cfg.validate()
    ids, mask = left_pad(prompts, cfg.pad_token_id)
    check_context(decoder.config, ids.shape[1], cfg.max_new_tokens)
    own = getattr(decoder, "generate", None)
    if own is not None:  # a runtime with its own scheduler (vLLM): the same settings, its own loop
        return own(prompts, cfg)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]: real tokens count from 0
    batch = ids.shape[0]
    generator = torch.Generator().manual_seed(cfg.seed)
    stop = torch.tensor(cfg.stop_tokens, dtype=torch.long)
    watch = Stopwatch(decoder.device)
    decoder.reset(batch)
    watch.start()
    logits = decoder.forward(ids, mask, positions, last_only=True)[:, -1]  # [B, V]
    prefill = watch.stop()
    done = torch.zeros(batch, dtype=torch.bool)
    out: list[Tensor] = []
    watch.start()
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
    decode = watch.stop()
    tokens = torch.stack(out, dim=1)  # [B, N]
    rows: list[list[int]] = []
    stopped: list[bool] = []
    for row in tokens.tolist():
        ends = [i for i, t in enumerate(row) if t in cfg.stop_tokens]
        rows.append(row[: ends[0] + 1] if ends else row)
        stopped.append(bool(ends))
    return Generation(rows, stopped, prefill, decode, steps=len(out) - 1)


def check_context(config: Any, prompt_tokens: int, new_tokens: int) -> None:
    """Refuse a prompt plus new tokens beyond the model's context (``max_position_embeddings``): past
    it the positions are ones the model never saw, and the output is silently garbage. The last new
    token is never fed back, so ``prompt + new - 1`` positions are used."""
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and prompt_tokens + new_tokens - 1 > limit:
        raise SurgeonError(f"the prompt ({prompt_tokens} tokens) plus --max-new-tokens {new_tokens} exceeds the "
                           f"model's context of {limit} tokens; shorten the prompt or lower --max-new-tokens")


def encode_prompts(tokenizer: Any, texts: Sequence[str], chat: bool = False) -> list[list[int]]:
    """Token ids of each prompt; ``chat`` wraps each in the tokenizer's chat template (a user turn)."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise SurgeonError("--chat: this model's tokenizer has no chat template")
        try:
            return [list(tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                                       tokenize=True, return_dict=False)) for t in texts]
        except Exception as exc:  # jinja2's TemplateError and transformers' ValueError: a broken template file
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise SurgeonError(f"--chat: the tokenizer's chat template cannot be applied: {first}") from None
    return [tokenizer(t)["input_ids"] for t in texts]


def eos_ids(directory: Path, tokenizer: Any) -> tuple[int, ...]:
    """EOS ids of ``generation_config.json`` (one or a list), else the tokenizer's."""
    path = Path(directory) / "generation_config.json"
    eos = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    return tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
