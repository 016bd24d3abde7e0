"""The ``llama.cpp`` backend: a GGUF file on llama.cpp, through llama-cpp-python's low-level C API.

What runs: a ``.gguf`` file as it is, or a model directory (or the default model) written once as
GGUF by :func:`export.gguf.export_gguf` into the model cache (``$SURGEON_EXPORT_CACHE/llama.cpp``,
keyed by the SHA-256 of its config, tokenizer and weight files; the writer renames a temporary
sibling into place, so an interrupted conversion leaves nothing). ``--dtype`` picks the tensor type
of that conversion: ``auto`` and ``float32`` -> F32 (the protocol's float32: the very weights torch
runs, so the two runtimes are compared on the same numbers), ``float16`` -> F16, ``bfloat16`` ->
BF16. Quantised files (Q8_0) come from ``surgeon-export gguf --type q8_0`` and run as files; a
file runs in its own type (``--dtype`` must then be ``auto`` or that type).

The KV cache is llama.cpp's own: one ``llama_context`` per backend, one llama.cpp sequence (seq id)
per batch row with its own cache stream (``kv_unified`` off), so a batch of prompts is one batch of
``llama_decode`` calls and rows never see each other's keys. The context is created in ``reset``
(outside any timed region) for the batch size and :data:`CONTEXT_TOKENS` positions per row, and
re-created larger, replaying the cached tokens, when a row outgrows it. Padding (mask 0) is never
fed to llama.cpp: each row holds only its real tokens, at the positions the decode loop gives,
so left-padded batches give each row the logits it would get alone (greedy is exact per row).
An F32 file runs in float32 throughout, as torch does: float32 keys and values in the cache, and
flash attention off (llama.cpp's CPU flash attention computes in float16); other files run with
llama.cpp's defaults (float16 cache, flash attention ``auto``). Logits are requested only where
they are used: the last position (``last_only``), or every position (``logits``, perplexity windows). Threads: ``--threads``
(else torch's thread count) for both decode (``n_threads``) and prompt batches (``n_threads_batch``).

llama.cpp's log goes nowhere (its warnings and errors are kept for the one-line error of a failed
load); ``--quiet`` therefore changes nothing here.

Tokenizer: the Hugging Face tokenizer of the model's directory (for a ``.gguf`` file, the directory
named like the file without ``.gguf``, else the directory holding it, when it has a
``config.json``; else transformers' reading of the GGUF file, cached by :mod:`base.loading`).
:meth:`LlamaCppBackend.tokenize` gives llama.cpp's own tokenisation, which the tests check
equals transformers' on the evaluation text.
"""

from __future__ import annotations

import ctypes
import logging
import weakref
from collections import Counter, deque
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from base.env import _version
from base.errors import SurgeonError
from base.formats import GGUF_TRUE_FFN_KEY
from base.loading import (
    cache_dir,
    directory_digest,
    load_tokenizer,
    open_gguf,
    resolve_model_dir,
)
from export.flops import flops_table
from export.gguf import export_gguf
from runtime.backend import CachedLogits, hf_config, pruning_config

log = logging.getLogger(__name__)

# How CI and the README build llama-cpp-python (from source: portable AVX2 CPU code, no OpenMP, no tools).
CMAKE_ARGS = ("-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
              "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF "
              "-DLLAMA_CURL=OFF -DGGML_OPENMP=OFF")
INSTALL_LINE = f'CMAKE_ARGS="{CMAKE_ARGS}" python3 -m pip install -c constraints.txt -e ".[llama]"'
TENSOR_TYPES = {"auto": "F32", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}  # --dtype -> GGUF type
FILE_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}  # GGUF type of the linears -> --dtype
CACHE_FORMAT = 3  # bump when export/gguf.py changes what it writes; old cached files are then rebuilt (2: MLP zero-padded, 3: checksums)
CONTEXT_TOKENS = 768  # positions per row a new context holds (llama.cpp pads to 256); grows when outgrown
UBATCH = 512  # tokens per llama_decode call (llama.cpp's default physical batch)
GGML_TYPE_F32, GGML_TYPE_F16 = 0, 1
FLASH_ATTN_AUTO, FLASH_ATTN_DISABLED = -1, 0  # enum llama_flash_attn_type
DECODER_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")

_LOG: deque[tuple[int, str]] = deque(maxlen=16)  # llama.cpp's warnings and errors (level, line), for messages
_CALLBACK: Any = None  # the ctypes log callback, kept alive for as long as llama.cpp may call it


def library() -> Any:
    """The ``llama_cpp`` module, its log silenced (kept in :data:`_LOG`); a one-line error if missing."""
    global _CALLBACK
    try:
        import llama_cpp
    except ImportError:
        raise SurgeonError(f"backend llama.cpp needs llama-cpp-python, built from source: {INSTALL_LINE}") from None
    if _CALLBACK is None:
        @llama_cpp.llama_log_callback
        def keep(level: int, text: bytes, user_data: Any) -> None:
            if level in (3, 4):  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR (ggml.h: NONE 0, DEBUG 1, INFO 2)
                line = text.decode("utf-8", "replace").strip()
                if line:
                    _LOG.append((level, line))

        _CALLBACK = keep
        llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
    return llama_cpp


def _last_error() -> str:
    """The first error llama.cpp logged since :data:`_LOG` was cleared (the cause; later lines say only
    that loading failed), else its last warning."""
    errors = [line for level, line in _LOG if level == 4]
    return errors[0] if errors else (_LOG[-1][1] if _LOG else "no message from llama.cpp")


# --- what runs: the GGUF file, its Hugging Face directory ---------------------------------------


def gguf_for_directory(directory: Path, tensor_type: str) -> Path:
    """The cached GGUF of a model directory in ``tensor_type`` (F32, F16, BF16), written on first use.

    The key hashes config.json, the tokenizer files and every weight file (their SHA-256), so an
    edited checkpoint gets a new file; :data:`CACHE_FORMAT` invalidates files of an older writer.
    """
    key = directory_digest(directory, f"llama.cpp-gguf-v{CACHE_FORMAT}-{tensor_type}")
    target = cache_dir() / "llama.cpp" / f"{directory.name}-{key[:16]}-{tensor_type.lower()}.gguf"
    if not target.is_file():
        log.info("writing %s as %s GGUF for llama.cpp at %s (once)", directory, tensor_type, target)
        export_gguf(directory, target, tensor_type=tensor_type, force=True)  # atomic: temporary sibling, renamed
    return target


def companion_directory(path: Path) -> Path:
    """The Hugging Face directory (config, tokenizer) of a ``.gguf`` file: ``FILE/`` beside ``FILE.gguf``,
    else the directory holding the file, when it has a config.json; else transformers' reading of the
    GGUF file itself (stock llama/qwen2/qwen3 files; cached by :func:`base.loading.resolve_model_dir`)."""
    for candidate in (path.with_suffix(""), path.parent):
        if (candidate / "config.json").is_file():
            return candidate
    try:
        return resolve_model_dir(path)[0]
    except SurgeonError as exc:
        raise SurgeonError(f"{path}: no tokenizer: no Hugging Face directory beside it ({path.with_suffix('')}/ or "
                           f"{path.parent}/ with a config.json), and transformers cannot read the file ({exc})") from None


def read_gguf(path: Path) -> dict:
    """Architecture, file type, per-layer sizes and parameter counts of a GGUF file (zeros counted in the
    stored tensors, Q8_0 dequantised), read with the ``gguf`` package; a one-line error if unreadable."""
    import gguf

    reader = open_gguf(path)  # our own files: checksums verified
    try:
        meta = {k: fld.contents() for k, fld in reader.fields.items() if not k.startswith("GGUF.")}
    except Exception as exc:  # the reader raises many types on a damaged file; all mean one thing
        message = str(exc).strip().splitlines()
        raise SurgeonError(f"cannot read GGUF file {path}: {message[0] if message else type(exc).__name__}") from None
    arch = str(meta.get("general.architecture", "?"))
    written, true = meta.get(f"{arch}.feed_forward_length"), meta.get(GGUF_TRUE_FFN_KEY)
    if true is not None:  # our writer's zero MLP channels (export/gguf.py, FFN_ALIGN) are not the model's
        blocks = len(true)
        written = [int(written)] * blocks if not isinstance(written, list) else [int(w) for w in written]
    counts = dict.fromkeys(("total", "decoder_linear", "decoder_linear_zeros", "total_zeros"), 0)
    types: Counter[str] = Counter()
    linear_types: Counter[str] = Counter()
    weight_bytes = 0
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue  # RoPE factors computed from the config, a buffer in torch, not a parameter
        data = np.asarray(t.data)
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            zeros = int((data == 0).sum())
        elif t.tensor_type == gguf.GGMLQuantizationType.BF16:
            zeros = int(((data.view(np.uint16) & 0x7FFF) == 0).sum())  # +0 and -0
        else:
            zeros = int((gguf.quants.dequantize(data, t.tensor_type) == 0).sum())
        n = int(t.n_elements)
        kind = t.name.split(".")[-2] if t.name.startswith("blk.") else ""
        if true is not None and (kind in ("ffn_gate", "ffn_up") or (kind == "ffn_down" and t.name.endswith(".weight"))):
            i = int(t.name.split(".")[1])
            padding = n // written[i] * (written[i] - int(true[i]))
            n, zeros = n - padding, zeros - padding
        counts["total"] += n
        counts["total_zeros"] += zeros
        weight_bytes += int(t.n_bytes)
        types[t.tensor_type.name] += 1
        if kind in DECODER_LINEARS and t.name.endswith(".weight"):
            counts["decoder_linear"] += n
            counts["decoder_linear_zeros"] += zeros
            linear_types[t.tensor_type.name] += 1
    del reader
    return {"architecture": arch, "counts": counts, "weight_bytes": weight_bytes, "tensor_types": dict(types),
            "linear_type": linear_types.most_common(1)[0][0] if linear_types else "?",
            "block_count": meta.get(f"{arch}.block_count"), "vocab_size": len(meta.get("tokenizer.ggml.tokens") or []),
            "file_type": meta.get("general.file_type")}


# --- the backend --------------------------------------------------------------------------------


class LlamaCppBackend(CachedLogits):
    """:class:`runtime.backend.Backend` over a GGUF file on llama.cpp (CPU), with llama.cpp's KV cache."""

    name = "llama.cpp"

    def __init__(self, path: str | Path, directory: Path, source: str, threads: int | None = None) -> None:
        self.lib = lib = library()
        self.path, self.directory, self.source = Path(path), Path(directory), source
        self.device = torch.device("cpu")
        self.threads = int(threads or torch.get_num_threads())
        self.info = read_gguf(self.path)
        self.config: Any = hf_config(self.directory)
        self.tokenizer = load_tokenizer(self.directory)
        self._check_directory()
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0
        _LOG.clear()
        model = lib.llama_model_load_from_file(str(self.path).encode(), params)
        if not model:
            raise SurgeonError(f"llama.cpp cannot load {self.path} ({self.info['architecture']}): {_last_error()}")
        self.model = model
        self.vocab = lib.llama_model_get_vocab(model)
        self.vocab_size = int(lib.llama_vocab_n_tokens(self.vocab))
        exact = self.info["linear_type"] == "F32"
        self.kv_type = GGML_TYPE_F32 if exact else GGML_TYPE_F16
        # llama.cpp's CPU flash attention computes in float16 (logits off by ~4e-4 of their scale on the
        # tiny models, against ~1e-6 without it): off for F32 files, llama.cpp's default (auto) otherwise.
        self.flash_attn = FLASH_ATTN_DISABLED if exact else FLASH_ATTN_AUTO
        self.ctx: Any = None
        self.n_seq = self.n_ctx_seq = 0
        self.history: list[list[tuple[int, int]]] = []  # per row: (token, position) in the cache
        self.batch = lib.llama_batch_init(UBATCH, 0, 1)
        self._handles: dict[str, Any] = {"model": model, "ctx": None, "batch": self.batch}
        weakref.finalize(self, _free, lib, self._handles)  # frees whichever context is current

    def _check_directory(self) -> None:
        """The tokenizer directory must describe the same model as the file (a neighbour of the same name
        could be another model)."""
        layers, vocab = self.info["block_count"], self.info["vocab_size"]
        config = self.config
        if layers is not None and int(layers) != int(config.num_hidden_layers) \
                or vocab and int(vocab) != int(config.vocab_size):
            raise SurgeonError(f"{self.directory} does not describe {self.path}: {config.num_hidden_layers} layers and "
                               f"vocabulary {config.vocab_size} there, {layers} and {vocab} in the file")

    # -- context and cache ---------------------------------------------------------------------

    def _new_context(self, n_seq: int, n_ctx_seq: int) -> None:
        """A fresh context (the old one freed first): ``n_seq`` rows of ``n_ctx_seq`` positions each."""
        lib = self.lib
        self._free_context()
        if n_seq > lib.llama_max_parallel_sequences():
            raise SurgeonError(f"llama.cpp runs at most {lib.llama_max_parallel_sequences()} sequences at once, "
                               f"not a batch of {n_seq}")
        n_ctx_seq = -(-n_ctx_seq // 256) * 256
        p = lib.llama_context_default_params()
        p.n_ctx = n_seq * n_ctx_seq
        p.n_batch = p.n_ubatch = UBATCH
        p.n_seq_max = n_seq
        p.n_outputs_max = 0  # up to a whole ubatch of logits (perplexity windows)
        p.n_outputs_max_per_seq = 0  # every position of a row, not only its last
        p.n_threads, p.n_threads_batch = self.threads, self.threads
        p.type_k = p.type_v = self.kv_type
        p.kv_unified = False  # one cache stream per row: rows attend only to their own tokens
        p.no_perf = True
        p.flash_attn_type = self.flash_attn
        _LOG.clear()
        ctx = lib.llama_init_from_model(self.model, p)
        if not ctx:
            raise SurgeonError(f"llama.cpp cannot create a context of {n_seq} x {n_ctx_seq} tokens: {_last_error()}")
        self.ctx = self._handles["ctx"] = ctx
        self.n_seq, self.n_ctx_seq = n_seq, n_ctx_seq

    def _free_context(self) -> None:
        if self.ctx is not None:
            self.lib.llama_free(self.ctx)
            self.ctx = self._handles["ctx"] = None

    def reset(self, batch_size: int) -> None:
        if self.ctx is not None and (self.n_seq, self.n_ctx_seq) == (batch_size, CONTEXT_TOKENS):
            self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        else:  # another batch size, or grown: a context of the usual size (its memory is this batch's only)
            self._new_context(batch_size, CONTEXT_TOKENS)
        self.history = [[] for _ in range(batch_size)]

    def _grow(self, needed: int) -> None:
        """Re-create the context with room for ``needed`` positions per row and replay the cached tokens."""
        self._new_context(self.n_seq, max(needed + 256, 2 * self.n_ctx_seq))
        self._decode([(row, tok, pos, -1) for row, cached in enumerate(self.history) for tok, pos in cached], None)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, last_only: bool = False) -> Tensor:
        if self.ctx is None:
            raise RuntimeError("forward before reset")
        batch, length = input_ids.shape
        if batch != len(self.history):
            raise RuntimeError(f"forward with {batch} rows after reset({len(self.history)})")
        real = attention_mask[:, -length:].bool().tolist()  # padding is never fed to llama.cpp
        ids, positions = input_ids.tolist(), position_ids.tolist()
        items: list[tuple[int, int, int, int]] = []  # (row, token, position, output column or -1)
        for row in range(batch):
            cols = [j for j in range(length) if real[row][j]]
            for j in cols:
                want = j == length - 1 if last_only else True
                items.append((row, ids[row][j], positions[row][j], (0 if last_only else j) if want else -1))
        needed = max(len(h) + sum(real[r]) for r, h in enumerate(self.history))
        if needed > self.n_ctx_seq:
            self._grow(needed)
        out = torch.zeros(batch, 1 if last_only else length, self.vocab_size)
        self._decode(items, out)
        for row, tok, pos, _ in items:
            self.history[row].append((tok, pos))
        return out  # [B, T or 1, V]; zeros where a position was padding

    def _decode(self, items: list[tuple[int, int, int, int]], out: Tensor | None) -> None:
        """Feed ``(row, token, position, column)`` items in ubatches; logits of column >= 0 go to ``out[row, column]``."""
        lib, batch = self.lib, self.batch
        tokens = np.ctypeslib.as_array(batch.token, shape=(UBATCH,))
        pos = np.ctypeslib.as_array(batch.pos, shape=(UBATCH,))
        n_seq_id = np.ctypeslib.as_array(batch.n_seq_id, shape=(UBATCH,))
        wants = np.ctypeslib.as_array(batch.logits, shape=(UBATCH,))
        for lo in range(0, len(items), UBATCH):
            chunk = items[lo: lo + UBATCH]
            n = len(chunk)
            rows = [c[0] for c in chunk]
            tokens[:n] = [c[1] for c in chunk]
            pos[:n] = [c[2] for c in chunk]
            n_seq_id[:n] = 1
            wants[:n] = [c[3] >= 0 for c in chunk]
            for i, row in enumerate(rows):
                batch.seq_id[i][0] = row
            batch.n_tokens = n
            rc = lib.llama_decode(self.ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}: {_last_error()}")
            targets = [(c[0], c[3]) for c in chunk if c[3] >= 0]
            if targets and out is not None:
                logits = np.ctypeslib.as_array(lib.llama_get_logits(self.ctx), shape=(len(targets), self.vocab_size))
                r, col = zip(*targets)
                out[list(r), list(col)] = torch.from_numpy(logits.copy())

    # -- tokenizer and facts ---------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        """llama.cpp's own token ids of ``text`` (special-token text is not parsed, as the protocol's
        evaluation reads plain text)."""
        lib = self.lib
        data = text.encode("utf-8")
        size = len(data) + 8
        buf = (lib.llama_token * size)()
        count = lib.llama_tokenize(self.vocab, data, len(data), buf, size, add_special, False)
        if count < 0:
            size = -count
            buf = (lib.llama_token * size)()
            count = lib.llama_tokenize(self.vocab, data, len(data), buf, size, add_special, False)
        return list(buf[:count])

    def describe(self) -> dict:
        info = self.info
        counts = info["counts"]
        linear = info["linear_type"]
        return {
            "source": self.source,
            "path": str(self.path),
            "bytes_on_disk": self.path.stat().st_size,
            "weight_bytes": info["weight_bytes"],
            "parameters": counts,
            "sparsity": counts["decoder_linear_zeros"] / counts["decoder_linear"] if counts["decoder_linear"] else 0.0,
            "pruning": pruning_config(self.directory),
            "dtype": FILE_DTYPES.get(linear, linear.lower()),
            "flops_per_token": flops_table(self.config),
            "llama_cpp": {
                "llama_cpp_python": _version("llama-cpp-python"), "architecture": info["architecture"],
                "tensor_types": info["tensor_types"], "file_type": info["file_type"],
                "kv_cache": "f32" if self.kv_type == GGML_TYPE_F32 else "f16",
                "flash_attn": "off" if self.flash_attn == FLASH_ATTN_DISABLED else "auto",
                "context_tokens_per_row": CONTEXT_TOKENS, "ubatch": UBATCH,
                "n_threads": self.threads, "n_threads_batch": self.threads, "tokenizer": str(self.directory),
            },
        }


def _free(lib: Any, handles: dict[str, Any]) -> None:
    """Free the context, the batch and the model (in that order: a context needs its model)."""
    if handles["ctx"] is not None:
        lib.llama_free(handles["ctx"])
    lib.llama_batch_free(handles["batch"])
    lib.llama_model_free(handles["model"])


def load_llama_cpp(spec: str | None, device: str, dtype: str, threads: int | None) -> LlamaCppBackend:
    """The ``llama.cpp`` backend: a ``.gguf`` file (in its own type), a model directory or the default
    model (None; written as F32/F16/BF16 GGUF per ``dtype`` into the cache first)."""
    library()  # a missing llama-cpp-python is named before any conversion
    if torch.device(device).type != "cpu":
        raise SurgeonError(f"backend llama.cpp runs on the CPU here (built without GPU support), not on {device}")
    path = Path(spec).expanduser() if spec is not None else None
    try:
        if path is not None and path.is_file() and path.suffix.lower() == ".gguf":
            backend = LlamaCppBackend(path, companion_directory(path), str(path), threads)
            want = TENSOR_TYPES.get(dtype) if dtype != "auto" else None
            if want is not None and backend.info["linear_type"] != want:
                raise SurgeonError(f"backend llama.cpp runs {path} in the type it was written in "
                                   f"({backend.info['linear_type']}), not {dtype}; write it with "
                                   "`surgeon-export gguf --type`")
            return backend
        if dtype not in TENSOR_TYPES:
            raise SurgeonError(f"--dtype {dtype}: backend llama.cpp converts to {', '.join(TENSOR_TYPES)}")
        directory, source = resolve_model_dir(spec)
        target = gguf_for_directory(directory, TENSOR_TYPES[dtype])
        return LlamaCppBackend(target, directory, f"{source} ({TENSOR_TYPES[dtype]} GGUF)", threads)
    except SurgeonError as exc:
        raise SurgeonError(f"backend llama.cpp cannot run {spec or 'the default model'}: {exc}") from None


__all__ = ["INSTALL_LINE", "LlamaCppBackend", "companion_directory", "gguf_for_directory", "library",
           "load_llama_cpp", "read_gguf"]
