"""Text for calibration and evaluation, and the token windows cut from it.

BENCHMARK_PROTOCOL.md: evaluation on ``wikitext-2-raw/wiki.test.raw``, calibration on
``wikitext-2/valid.txt`` (never the test split), 64 windows of 512 tokens at random offsets drawn
with Python's ``random`` seeded 0 (``randint(0, N - T - 1)``). Windows never start with BOS unless
the tokenizer's own convention adds it (``tokenizer("x")`` starts with BOS, as Gemma's does); then
every window is BOS followed by ``T - 1`` text tokens (:func:`leading_bos`), recorded as ``bos``. Both files ship inside the package
(``base/corpora/``, gzip, checksummed on every read; provenance and licence in its README);
``--data-dir`` or ``$SURGEON_EXPORT_DATA`` name a directory to read them from instead. Where an
explicit directory lacks the calibration file, calibration text is sampled from the model itself
(and logged as such).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from base.errors import SurgeonError

log = logging.getLogger(__name__)

DATA_ENV = "SURGEON_EXPORT_DATA"
EVAL_FILE = "wikitext-2-raw/wiki.test.raw"
CALIB_FILE = "wikitext-2/valid.txt"
CORPORA = Path(__file__).resolve().parent / "corpora"  # the packaged copies, gzip (README.md there)
CORPUS_SHA256 = {  # of the uncompressed texts (corpora/README.md)
    EVAL_FILE: "bbf94c53a05abe9ee670d3b6343608095822c85e26de37c70b24fc571964574a",
    CALIB_FILE: "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
}


def find_data_dir(explicit: str | Path | None = None) -> Path | None:
    """A corpus directory the user named: ``explicit``, then ``$SURGEON_EXPORT_DATA``; None: the packaged copies."""
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
    return None


def packaged_corpus(name: str) -> tuple[str, str]:
    """The text of a packaged corpus (``EVAL_FILE`` or ``CALIB_FILE``), checksum verified, and its origin."""
    file = CORPORA / (Path(name).name + ".gz")
    try:
        data = gzip.decompress(file.read_bytes())
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise SurgeonError(f"packaged corpus {file} is unreadable ({exc}); reinstall surgeon-export") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != CORPUS_SHA256[name]:
        raise SurgeonError(f"packaged corpus {file} is corrupt (sha256 {digest[:12]}..., expected "
                           f"{CORPUS_SHA256[name][:12]}...); reinstall surgeon-export")
    return data.decode("utf-8"), f"{name} (packaged copy, sha256 {digest[:12]})"


def corpus(name: str, data_dir: str | Path | None) -> tuple[str, str] | None:
    """Text and origin of corpus ``name``: from the user's directory when one is named (None if it lacks
    the file), else the packaged copy."""
    root = find_data_dir(data_dir)
    if root is None:
        return packaged_corpus(name)
    path = root / name
    return (read_text(path), str(path)) if path.is_file() else None


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


def leading_bos(tokenizer: object) -> int | None:
    """The BOS id when the tokenizer's own convention puts it before every text (``tokenizer("x")`` starts with
    it: Gemma, Llama-2), else None (SmolLM2, GPT-2). Windows then lead with it (:func:`with_bos`)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("x")["input_ids"]  # type: ignore[operator]
    return int(bos) if len(ids) > 0 and ids[0] == bos else None


def with_bos(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    """``[W, T-1]`` text windows with a BOS column in front (``[W, T]``); unchanged when ``bos`` is None."""
    if bos is None:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), bos, dtype=windows.dtype), windows], dim=1)


def tokenize(tokenizer: object, text: str) -> torch.Tensor:
    """Token ids ``[N]`` of a whole text, no special tokens added (as the protocol says)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # type: ignore[operator]
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class TokenSource:
    """Token ids and a description of where they came from (for logs and reports)."""

    ids: torch.Tensor  # [N] long
    origin: str
    bos: int | None = None  # evaluation text: lead each window with this BOS id (the tokenizer's convention)


def eval_tokens(tokenizer: object, text_file: str | Path | None, data_dir: str | Path | None) -> TokenSource:
    """Evaluation tokens: the user's text file, else the WikiText-2 test split; ``bos`` as the tokenizer adds it."""
    bos = leading_bos(tokenizer)
    if text_file is not None:
        return TokenSource(tokenize(tokenizer, read_text(text_file)), str(text_file), bos)
    found = corpus(EVAL_FILE, data_dir)
    if found is None:
        raise SurgeonError(f"no evaluation text: {find_data_dir(data_dir)} has no {EVAL_FILE} "
                           "(drop --data-dir / $SURGEON_EXPORT_DATA to use the packaged copy, or give --text)")
    text, origin = found
    return TokenSource(tokenize(tokenizer, text), origin, bos)


def check_window(seq_len: int, config: Any) -> None:
    """Refuse windows longer than the context of a model with this (Hugging Face) config."""
    if seq_len < 2:
        raise SurgeonError(f"window length must be at least 2 tokens, got {seq_len}")
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise SurgeonError(f"window of {seq_len} tokens is longer than the model's context ({limit})")


def random_windows(ids: torch.Tensor, n: int, seq_len: int, seed: int = 0, bos: int | None = None) -> torch.Tensor:
    """``n`` windows ``[n, seq_len]`` at offsets ``randint(0, N - seq_len - 1)`` from ``Random(seed)``.

    With ``bos``: each window is BOS then ``seq_len - 1`` text tokens (offsets drawn for that length).
    """
    if bos is not None:
        return with_bos(random_windows(ids, n, seq_len - 1, seed), bos)
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
    """Calibration windows ``[n, seq_len]``: a text file, the WikiText-2 validation split, or self-generated.

    Args:
        text_file: the user's own text; overrides the corpus.
        source: ``"auto"`` uses text where there is some and falls back to generation with a logged
            message; ``"wikitext"`` insists on the corpus; ``"generated"`` always samples.
    """
    check_window(seq_len, model.config)
    bos = leading_bos(tokenizer)  # windows lead with BOS where the tokenizer's convention does
    if source != "generated":
        if text_file is not None:
            ids = tokenize(tokenizer, read_text(text_file))
            return TokenSource(random_windows(ids, n, seq_len, seed, bos), str(text_file), bos)
        found = corpus(CALIB_FILE, data_dir)
        if found is not None:
            text, origin = found
            return TokenSource(random_windows(tokenize(tokenizer, text), n, seq_len, seed, bos), origin, bos)
        if source == "wikitext":
            raise SurgeonError(f"calibration corpus {CALIB_FILE} not found in {find_data_dir(data_dir)}")
        log.warning("no calibration text found (%s has no %s): sampling %d x %d tokens from the model itself",
                    find_data_dir(data_dir), CALIB_FILE, n, seq_len)
    ids = generate_calibration(model, tokenizer, n, seq_len, seed)
    return TokenSource(ids, f"generated by the model (seed {seed})", bos)
