"""Text for calibration and evaluation, and the token windows cut from it.

BENCHMARK_PROTOCOL.md: evaluation on ``wikitext-2-raw/wiki.test.raw``, calibration on
``wikitext-2/valid.txt`` (never the test split), 64 windows of 512 tokens at random offsets drawn
with Python's ``random`` seeded 0 (``randint(0, N - T - 1)``). The shared corpora are found through
``--data-dir``, ``$SURGEON_EXPORT_DATA``, or ``../shared/data`` beside the checkout; where they are
absent, calibration text is sampled from the model itself (and logged as such).
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from surgeon.errors import SurgeonError

log = logging.getLogger(__name__)

DATA_ENV = "SURGEON_EXPORT_DATA"
EVAL_FILE = "wikitext-2-raw/wiki.test.raw"
CALIB_FILE = "wikitext-2/valid.txt"


def find_data_dir(explicit: str | Path | None = None) -> Path | None:
    """The shared data directory: ``explicit``, then ``$SURGEON_EXPORT_DATA``, then ``../shared/data``.

    Returns None when no candidate exists (an explicit path that does not exist is an error).
    """
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            raise SurgeonError(f"data directory not found: {path}")
        return path
    if os.environ.get(DATA_ENV):
        path = Path(os.environ[DATA_ENV]).expanduser()
        if not path.is_dir():
            raise SurgeonError(f"${DATA_ENV} points to a missing directory: {path}")
        return path
    repo = Path(__file__).resolve().parents[1]
    for candidate in (repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return None


def read_text(path: str | Path) -> str:
    """Read a UTF-8 text file with clear errors for missing, binary or empty files."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SurgeonError(f"text file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SurgeonError(f"{path} is not UTF-8 text") from None
    if not text.strip():
        raise SurgeonError(f"text file is empty: {path}")
    return text


def tokenize(tokenizer: object, text: str) -> torch.Tensor:
    """Token ids ``[N]`` of a whole text, no special tokens added (as the protocol says)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # type: ignore[operator]
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class TokenSource:
    """Token ids and a description of where they came from (for logs and reports)."""

    ids: torch.Tensor  # [N] long
    origin: str


def eval_tokens(tokenizer: object, text_file: str | Path | None, data_dir: str | Path | None) -> TokenSource:
    """Evaluation tokens: the user's text file, else the shared WikiText-2 test split."""
    if text_file is not None:
        return TokenSource(tokenize(tokenizer, read_text(text_file)), str(text_file))
    root = find_data_dir(data_dir)
    if root is None or not (root / EVAL_FILE).is_file():
        raise SurgeonError(
            f"no evaluation text: the shared corpus {EVAL_FILE} was not found (set --data-dir or "
            f"${DATA_ENV}), and no --text file was given"
        )
    return TokenSource(tokenize(tokenizer, read_text(root / EVAL_FILE)), str(root / EVAL_FILE))


def check_window(seq_len: int, model: nn.Module) -> None:
    """Refuse windows longer than the model's context."""
    if seq_len < 2:
        raise SurgeonError(f"window length must be at least 2 tokens, got {seq_len}")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise SurgeonError(f"window of {seq_len} tokens is longer than the model's context ({limit})")


def random_windows(ids: torch.Tensor, n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``n`` windows ``[n, seq_len]`` at offsets ``randint(0, N - seq_len - 1)`` from ``Random(seed)``."""
    if n < 1:
        raise SurgeonError(f"number of calibration samples must be at least 1, got {n}")
    if ids.numel() < seq_len + 2:
        raise SurgeonError(
            f"calibration text has {ids.numel()} tokens, too few for a window of {seq_len}"
        )
    if ids.numel() < n * seq_len:  # the windows would mostly repeat the same tokens
        raise SurgeonError(
            f"calibration text has {ids.numel():,} tokens, too few for {n} windows of {seq_len} "
            f"({n * seq_len:,} tokens); give fewer --calib-samples, a shorter --seq-len or more text"
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seq_len - 1) for _ in range(n)]
    return torch.stack([ids[s : s + seq_len] for s in starts])


CalibSource = Literal["auto", "wikitext", "generated"]


@torch.no_grad()
def generate_calibration(
    model: nn.Module, tokenizer: object, n: int, seq_len: int, seed: int = 0, batch_size: int = 16
) -> torch.Tensor:
    """Sample ``n`` sequences of ``seq_len`` tokens from the model itself, starting at BOS.

    Used when no calibration text exists. Plain ancestral sampling at temperature 1 with the KV
    cache, seeded; the result is data-free calibration in the sense of LLM-QAT (Liu et al. 2023).
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        bos = getattr(model.config, "bos_token_id", None) or 0
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        ids = torch.full((b, 1), int(bos), dtype=torch.long, device=device)
        past = None
        step_input = ids
        for _ in range(seq_len - 1):
            result = model(input_ids=step_input, past_key_values=past, use_cache=True)
            past = result.past_key_values
            probs = torch.softmax(result.logits[:, -1].float(), dim=-1)  # [b, vocab]
            step_input = torch.multinomial(probs.cpu(), 1, generator=gen).to(device)
            ids = torch.cat([ids, step_input], dim=1)
        out.append(ids.cpu())
    return torch.cat(out)


def calibration_windows(
    model: nn.Module,
    tokenizer: object,
    *,
    n: int = 64,
    seq_len: int = 512,
    seed: int = 0,
    text_file: str | Path | None = None,
    data_dir: str | Path | None = None,
    source: CalibSource = "auto",
) -> TokenSource:
    """Calibration windows ``[n, seq_len]``: a text file, the shared WikiText-2 validation split, or self-generated.

    Args:
        text_file: the user's own text; overrides the shared corpus.
        source: ``"auto"`` uses text where there is some and falls back to generation with a logged
            message; ``"wikitext"`` insists on the shared corpus; ``"generated"`` always samples.
    """
    check_window(seq_len, model)
    if source != "generated":
        if text_file is not None:
            ids = tokenize(tokenizer, read_text(text_file))
            return TokenSource(random_windows(ids, n, seq_len, seed), str(text_file))
        root = find_data_dir(data_dir)
        if root is not None and (root / CALIB_FILE).is_file():
            ids = tokenize(tokenizer, read_text(root / CALIB_FILE))
            return TokenSource(random_windows(ids, n, seq_len, seed), str(root / CALIB_FILE))
        if source == "wikitext":
            raise SurgeonError(f"calibration corpus {CALIB_FILE} not found (set --data-dir or ${DATA_ENV})")
        log.warning(
            "no calibration text found (%s missing; set --data-dir or $%s): sampling %d x %d "
            "tokens from the model itself",
            CALIB_FILE, DATA_ENV, n, seq_len,
        )
    ids = generate_calibration(model, tokenizer, n, seq_len, seed)
    return TokenSource(ids, f"generated by the model (seed {seed})")
