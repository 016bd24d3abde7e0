"""One ``.gguf`` file for llama.cpp from a Hugging Face directory (Llama and Gemma families, per-layer shapes too).

:func:`export_gguf` reads ``config.json``, the safetensors weights and the tokenizer files of a
model directory and writes one GGUF file with the ``gguf`` package (``GGUFWriter``; Q8_0 through
``gguf.quants``), one tensor at a time. Tensor types: F32, F16, BF16, Q8_0.

The mapping, decided from llama.cpp's own sources (ggml-org/llama.cpp):

- ``src/llama-model.cpp``, ``llama_model::load_hparams``: ``{arch}.feed_forward_length``,
  ``{arch}.attention.head_count`` and ``{arch}.attention.head_count_kv`` are read with
  ``ml.get_key_or_arr`` into ``hparams.n_ff_arr`` / ``n_head_arr`` / ``n_head_kv_arr``: a scalar
  (repeated for every layer) or an array of ``block_count`` entries, for every architecture
  (``llama-model-loader.cpp``, ``get_key_or_arr``: an array of another length is an error).
  ``attention.key_length``/``value_length`` default to ``n_embd / n_head(0)``, so we always write
  them (= ``head_dim``); for ``llama`` and ``deci`` ``rope.dimension_count`` must equal the key
  length ("invalid n_rot").
- ``llama_model::load_tensors``, ``case LLM_ARCH_LLAMA``: every layer's tensors are created with
  ``n_head = hparams.n_head()``, ``n_embd_k_gqa = hparams.n_embd_k_gqa()`` and
  ``n_ff = hparams.n_ff()``, i.e. layer 0's sizes for all layers; a layer of another size fails
  the shape check. The plain ``llama`` architecture therefore cannot hold per-layer shapes, even
  with arrays in the metadata.
- ``case LLM_ARCH_DECI`` (DeciLM / Llama-3_1-Nemotron-NAS) creates each layer with
  ``hparams.n_head(i)``, ``n_head_kv(i)``, ``n_embd_k_gqa(i)`` and ``n_ff(i)``, and
  ``src/models/deci.cpp`` (``llm_build_deci``) builds each layer with its own ``n_head(il)``,
  ``n_head_kv(il)``, ``n_ff(il)``; the KV cache is per layer (``n_embd_k_gqa(il)``). Otherwise
  it is Llama: RMSNorm, SwiGLU, ``LLAMA_ROPE_TYPE_NORM`` (``llama_model_rope_type``), scale
  ``1/sqrt(head_dim)``, ``output.weight`` optional (``token_embd`` reused when absent).
- convert_hf_to_gguf.py, ``LlamaModel`` / ``DeciModel``: ``permute`` reorders Q and K rows from
  Hugging Face's rotate-half RoPE layout to llama.cpp's NORM (interleaved pairs) layout, per head
  (K with the KV head count); ``DeciModel.modify_tensors`` does it per layer with that layer's
  head counts, biases too; ``DeciModel.set_gguf_parameters`` writes the per-layer lists with
  ``add_head_count``/``add_head_count_kv``/``add_feed_forward_length``. ``Qwen2Model`` and
  ``Qwen3Model`` (``qwen2``/``qwen3``, ``LLAMA_ROPE_TYPE_NEOX``) are written unpermuted.
- ``TextModel.prepare_tensors``: 1-D tensors and ``*_norm.weight`` stay F32; a tensor whose rows
  are not a multiple of the Q8_0 block (32) falls back to F16 (``gguf.QuantError``).
- Tokenizer: ``get_vocab_base`` / ``_set_vocab_gpt2`` and ``get_vocab_base_pre``, in
  :mod:`export.gguf_tokenizer`.

- ``src/models/gemma.cpp``, ``gemma2.cpp``, ``gemma3.cpp`` (llama.cpp's Gemma, Gemma 2, Gemma 3
  text): every layer is created with layer 0's sizes (``LLAMA_LOAD_LOCALS``), so per-layer shapes are
  refused; NEOX RoPE (no Q/K permutation); embeddings scaled by ``sqrt(n_embd)``; GELU (tanh);
  ``output.weight`` only for gemma3 (gemma/gemma2 always reuse ``token_embd``). RMSNorm is ``x * w``
  where Hugging Face's Gemma computes ``x * (1 + w)``, so 1 is added to every norm weight
  (convert_hf_to_gguf.py's ``GemmaModel``/``Gemma2Model``/``Gemma3Model.modify_tensors`` do the
  same). q is scaled by ``1/sqrt(head_dim)`` (gemma2/gemma3 at 46/62 layers: ``1/sqrt(hidden //
  heads)``, the "27B" rule) and no key sets another scale, so ``query_pre_attn_scalar`` is folded in:
  Gemma 2's ``attn_q`` or Gemma 3's ``attn_q_norm`` (q passes RMSNorm first) is multiplied by the
  ratio of the two scales. ``attention.sliding_window_pattern`` is read as one flag per layer
  (``load_swa_pattern``), so any ``layer_types`` is written as it is, with ``attention.sliding_window``
  and, for the sliding layers, ``rope.freq_base_swa`` (gemma3's sliding layers get no RoPE scaling,
  gemma2's the global one). gemma2 always soft-caps (``attn_logit_softcapping``,
  ``final_logit_softcapping``: required); gemma3 only the final logits, when set.

The per-family rules (architecture, permutation, norm offset, tensors, sliding and scaling keys) are
:class:`base.adapters.GgufArch` values on each adapter; this module applies them.

So: ``llama``/``mistral`` -> ``llama``, ``qwen2`` -> ``qwen2``, ``qwen3`` -> ``qwen3`` when every
layer has the same sizes (stock checkpoints, ``--uniform`` checkpoints, and ``surgeon_*`` ones
whose layers happen to agree); a ``surgeon_llama``/``surgeon_mistral``/``surgeon_qwen2``
checkpoint whose layers differ -> ``deci`` with per-layer arrays; ``gemma``/``gemma2``/``gemma3_text``
-> ``gemma``/``gemma2``/``gemma3`` (uniform layers only). What llama.cpp cannot express is
refused with a one-line :class:`SurgeonError`: per-layer Qwen3 (``deci`` has no Q/K norms), a
query bias when ``heads * head_dim != hidden`` (``llama``, ``deci`` and ``qwen2`` create
``attn_q.bias`` with ``n_embd`` rows; ``qwen2`` also needs ``attn_q`` square), Qwen3 attention
biases (not read by ``qwen3``). ``uniform=True`` insists on the stock architecture.

MLP widths are padded with zero channels to a multiple of :data:`FFN_ALIGN` (32): ggml's tiled
CPU matmul for prompt processing (``ggml-cpu/llamafile/sgemm.cpp``, ``llamafile_sgemm``) serves
F32/F16 weights only when the inner dimension ``k`` is a multiple of 8 (AVX2) or 16 (AVX-512), and
Q8_0 rows come in blocks of 32; ``ffn_down`` of a pruned model (``k`` = its MLP width, e.g. 1126)
otherwise falls back to the generic kernel, and the smaller model's prefill was slower than the
dense one's (1.30x the latency at 1x128, measured). A zero channel adds nothing (``silu(0) * 0``,
and a zero ``ffn_down`` column), so outputs are unchanged; the true widths are kept under
``surgeon.feed_forward_length`` (:data:`base.formats.GGUF_TRUE_FFN_KEY`) and :mod:`base.loading` cuts the padding when it reads the file back.

The file is written to a temporary sibling and renamed into place; nothing is left behind on
failure, and an existing file is replaced only with ``force``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from base.adapters import ADAPTERS, GgufArch, get_adapter
from base.errors import SurgeonError
from base.files import check_writable, clean_stale, temp_path, write_error
from base.formats import GGUF_METADATA_SHA_KEY, GGUF_TENSOR_SHA_KEY, GGUF_TRUE_FFN_KEY, REPORT_FILE
from base.loading import (
    check_finite,
    check_safetensors,
    gguf_metadata_digest,
    gguf_tensor_digest,
    read_config,
    weight_files,
)
from base.modeling import MODEL_TYPE_PREFIX, LayerShape, stock_model_type
from export.gguf_tokenizer import GgufVocab, read_vocab, write_vocab

TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0")
Q8_0_BLOCK = 32
FFN_ALIGN = 32  # MLP widths padded with zero channels to this multiple (the module docstring says why)

@dataclass
class _Model:
    """What config.json says, and the llama.cpp architecture chosen for it."""

    model_type: str
    target: GgufArch  # the llama.cpp architecture written
    hidden: int
    head_dim: int
    vocab_size: int
    context_length: int
    rms_eps: float
    rope_theta: float
    rope_type: str
    rope: dict[str, Any]
    layers: list[LayerShape]
    tied: bool
    norm_offset: float = 0.0  # added to every RMSNorm weight (the family's x * (norm_offset + w); llama.cpp: x * w)
    ffn_align: int = 1
    sliding: list[bool] = field(default_factory=list)  # per layer: sliding-window attention (Gemma 2/3)
    sliding_window: int = 0
    rope_theta_swa: float | None = None  # RoPE base of the sliding layers, when the architecture reads one
    softcaps: dict[str, float] = field(default_factory=dict)  # config key -> value (written as llama.cpp's keys)
    q_scale: float = 1.0  # folded into target.q_scale_into: Hugging Face's q scale over llama.cpp's

    @property
    def arch(self) -> str:
        return self.target.name

    def ffn_width(self, s: LayerShape) -> int:
        """The MLP width written: ``s.intermediate_size`` rounded up to :attr:`ffn_align`."""
        return -(-s.intermediate_size // self.ffn_align) * self.ffn_align

    @property
    def padded(self) -> bool:
        return any(self.ffn_width(s) != s.intermediate_size for s in self.layers)

    @property
    def per_layer(self) -> bool:
        return self.target.per_layer

    @property
    def permute_qk(self) -> bool:  # llama.cpp NORM RoPE (interleaved pairs) needs Q/K rows reordered
        return self.target.permute_qk


@dataclass
class _Tensor:
    """One output tensor: where its data comes from and how it is turned into GGUF bytes."""

    name: str  # GGUF name
    source: str  # safetensors key ("" for a computed tensor)
    shape: tuple[int, ...]  # numpy order (rows last)
    qtype: Any  # gguf.GGMLQuantizationType
    permute_heads: int = 0  # >0: reorder rows for llama.cpp's RoPE, this many heads
    offset: float = 0.0  # added to every value (Gemma's RMSNorm 1 + w)
    scale: float = 1.0  # then multiplied into every value (query_pre_attn_scalar folded into q)
    pad: tuple[int, int] = (0, 0)  # zero rows, zero columns appended (MLP widths padded to FFN_ALIGN)
    data: torch.Tensor | None = None  # computed tensors (rope_freqs)

    @property
    def nbytes(self) -> int:
        import gguf

        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * size


def export_gguf(
    model_dir: Path | str,
    out: Path | str,
    *,
    tensor_type: str = "f16",
    uniform: bool = False,
    force: bool = False,
    source: str | None = None,
    ffn_align: int = FFN_ALIGN,
) -> dict:
    """Write ``model_dir`` (a Hugging Face Llama- or Gemma-family directory) as one GGUF file for llama.cpp.

    Its model card is written beside it as ``FILE.md`` (:func:`card_path`), renamed into place just
    before the GGUF file itself; ``source`` is what the user named (for the card's lineage).

    Args:
        model_dir: ``config.json``, safetensors weights and ``tokenizer.json`` (BPE) of a ``llama``,
            ``mistral``, ``qwen2``, ``qwen3``, ``gemma``, ``gemma2`` or ``gemma3_text`` model, or of
            its ``surgeon_*`` per-layer variant.
        out: the ``.gguf`` file to write (written to a temporary sibling, then renamed).
        tensor_type: f32, f16, bf16 or q8_0 for the 2-D weights (norms and biases stay F32; a
            Q8_0 tensor whose rows are not a multiple of 32 is written F16, as llama.cpp's
            converter does).
        uniform: insist on the family's stock llama.cpp architecture (``llama``/``qwen2``/
            ``qwen3``/``gemma*``); a checkpoint whose layers differ in size is then refused instead of being
            written as ``deci``.
        force: replace an existing ``out``.
        ffn_align: MLP widths are padded with zero channels to a multiple of this (1: never), so
            that llama.cpp's fast matmul applies (module docstring).

    Returns:
        A manifest: architecture, tensor type, per-layer sizes, bytes, tensor count, ...

    Example:
        >>> export_gguf(Path("small"), Path("small.gguf"), tensor_type="q8_0")  # doctest: +SKIP
    """
    import gguf

    qtype = _tensor_type(tensor_type)
    model_dir, out = Path(model_dir).expanduser(), Path(out).expanduser()
    check_gguf_target(out, force)
    if not model_dir.is_dir():
        raise SurgeonError(f"model directory not found: {model_dir}")
    _check_not_input(out, model_dir)
    if ffn_align < 1:
        raise SurgeonError(f"--ffn-align must be at least 1, got {ffn_align}")
    model = _describe(read_config(model_dir), uniform)
    model.ffn_align = ffn_align
    files = weight_files(model_dir)
    for f in files:
        check_safetensors(f)
    sources = _index(files)
    tensors = _plan_tensors(model, sources, qtype)
    vocab = read_vocab(model_dir, model.vocab_size)

    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out.parent, out.name)
    clean_stale(out.parent, card_path(out).name)
    # Fresh sibling names (the writer creates them, so the files get the usual permissions), renamed at the end.
    tmp, card_tmp = temp_path(out), temp_path(card_path(out))
    with _quiet_gguf():
        writer = gguf.GGUFWriter(None, model.arch)
    try:
        _write_metadata(writer, model, vocab, qtype, model_dir.name)
        writer.add_string(GGUF_METADATA_SHA_KEY, _UNSEALED)  # placeholders of the final length, sealed below
        writer.add_array(GGUF_TENSOR_SHA_KEY, [_UNSEALED] * len(tensors))
        for t in tensors:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        with _quiet_gguf():
            writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        digests = []
        with _open_all(files) as handles:
            for t in tensors:
                data = _encode(t, sources, handles)
                digests.append(gguf_tensor_digest(t.name, reversed(t.shape), t.qtype.name, data))
                writer.write_tensor_data(data)
        writer.close()
        _seal(tmp, digests)
        _write_gguf_card(card_tmp, out, model_dir, source, qtype.name, model.arch)
        os.replace(card_tmp, card_path(out))  # the card first: a .gguf is never there without it
        os.replace(tmp, out)
    except BaseException as exc:
        try:
            writer.close()
        except OSError:  # the disk that failed the write may fail the flush too
            pass
        tmp.unlink(missing_ok=True)
        card_tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_error(exc, out) from None
        raise

    kinds = Counter(t.qtype.name for t in tensors)
    return {
        "format": "gguf",
        "path": str(out),
        "source": str(model_dir),
        "model_type": model.model_type,
        "architecture": model.arch,
        "per_layer_shapes": model.per_layer,
        "tensor_type": qtype.name,
        "file_type": int(_file_type(qtype)),
        "hidden_size": model.hidden,
        "head_dim": model.head_dim,
        "layers": [s.to_dict() for s in model.layers],
        "feed_forward_length_written": [model.ffn_width(s) for s in model.layers],  # zero-padded to ffn_align
        "ffn_align": ffn_align,
        "vocab_size": model.vocab_size,
        "tied_embeddings": model.tied,
        "qk_permuted": model.permute_qk,
        "norm_offset": model.norm_offset,
        "query_scale_folded": model.q_scale,
        "sliding_layers": model.sliding,
        "tokenizer_pre": vocab.pre,
        "add_bos_token": vocab.add_bos,
        "tensor_count": len(tensors),
        "tensor_types": dict(sorted(kinds.items())),
        "f16_fallback": [t.name for t in tensors if qtype.name == "Q8_0" and t.qtype.name == "F16"],
        "bytes": out.stat().st_size,
        "card": str(card_path(out)),
    }


# --- options and target -------------------------------------------------------------------------


def _tensor_type(value: str) -> Any:
    import gguf

    name = str(value).upper()
    if name not in TENSOR_TYPES:
        raise SurgeonError(f"GGUF tensor type must be one of {', '.join(TENSOR_TYPES)}, got {value!r}")
    return gguf.GGMLQuantizationType[name]


_UNSEALED = "0" * 64  # a checksum's place in the header before the data is written


@contextlib.contextmanager
def _quiet_gguf() -> Iterator[None]:
    """The gguf package logs its own progress at INFO ("This GGUF file is for Little Endian only",
    "Writing the following files"); only our progress belongs in our log."""
    gguf_log = logging.getLogger("gguf")
    level = gguf_log.level
    gguf_log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        gguf_log.setLevel(level)


def _seal(path: Path, digests: list[str]) -> None:
    """Write the tensor checksums, then the metadata checksum, into their placeholders in ``path``
    (in place: same lengths; ``base.loading.verify_gguf_checksums`` checks them on every read)."""
    import gguf

    reader = gguf.GGUFReader(str(path), "r+")
    tensor_field = reader.fields[GGUF_TENSOR_SHA_KEY]
    for index, digest in zip(tensor_field.data, digests, strict=True):
        tensor_field.parts[index][:] = np.frombuffer(digest.encode(), dtype=np.uint8)
    meta_field = reader.fields[GGUF_METADATA_SHA_KEY]
    meta_field.parts[meta_field.data[0]][:] = np.frombuffer(gguf_metadata_digest(reader).encode(), dtype=np.uint8)
    reader.data.flush()
    del reader


def _file_type(qtype: Any) -> Any:
    import gguf

    return {
        "F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
        "BF16": gguf.LlamaFileType.MOSTLY_BF16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[qtype.name]


def check_gguf_target(out: Path, force: bool) -> None:
    """Refuse a directory, or an existing file (or its card) unless ``force`` (call before slow work)."""
    if out.is_dir():
        raise SurgeonError(f"output path is a directory: {out} (give the .gguf file to write)")
    for path in (out, card_path(out)):
        if path.exists() and not force:
            raise SurgeonError(f"output file exists: {path} (use --force to replace it)")
    check_writable(out, "GGUF file")


def _check_not_input(out: Path, model_dir: Path) -> None:
    """Refuse an ``out`` (or its card) that would replace a file of the input model, even with ``force``:
    inside the model directory only a ``.gguf`` file (and the card beside an earlier one) may be written."""
    inputs = {f.resolve() for f in model_dir.iterdir() if f.is_file() and f.suffix.lower() != ".gguf"}
    target = out.resolve()
    if target in inputs or (target.is_relative_to(model_dir.resolve()) and target.suffix.lower() != ".gguf"):
        raise SurgeonError(f"--out {out} is inside the input model {model_dir} and not a .gguf file: it would "
                           "replace the model's own files; write the GGUF file elsewhere or name it FILE.gguf")
    card = card_path(out)
    if card.resolve() in inputs and not out.is_file():
        raise SurgeonError(f"the model card of --out {out} would replace the input model's {card.name}; "
                           "choose another name for the GGUF file")


def card_path(out: Path) -> Path:
    """Where a GGUF file's model card goes: ``FILE.md`` beside ``FILE.gguf`` (a GGUF file is one file)."""
    return out.with_suffix(".md")


def _write_gguf_card(path: Path, out: Path, model_dir: Path, source: str | None, qtype: str, arch: str) -> None:
    from export.card import model_card

    try:
        report = json.loads((model_dir / REPORT_FILE).read_text())
    except (OSError, ValueError):
        report = {}
    text = model_card(title=f"{out.name}: GGUF for llama.cpp", source=source or str(model_dir), report=report,
                      source_dir=model_dir, library="gguf", tags=["gguf", "llama.cpp"],
                      notes=[f"GGUF architecture `{arch}`, tensor type {qtype}"],
                      usage=[f"`llama-cli -m {out.name}` (llama.cpp); the card of this file is `{path_name(out)}`."])
    path.write_text(text)


def path_name(out: Path) -> str:
    return card_path(out).name


# --- config -> architecture ---------------------------------------------------------------------


def _describe(config: dict, uniform: bool) -> _Model:
    model_type = str(config["model_type"])
    stock = stock_model_type(model_type)
    try:
        adapter = get_adapter(model_type)
    except SurgeonError:
        adapter = None
    target = adapter.gguf_arch(model_type) if adapter is not None else None
    if adapter is None or target is None:
        supported = ", ".join(t.name for a in ADAPTERS for t in a.types if t.gguf is not None)
        raise SurgeonError(
            f"GGUF export does not support architecture {model_type!r}; supported: {supported} "
            f"(and their {MODEL_TYPE_PREFIX}* per-layer-shape variants)"
        )
    hidden = _int(config, "hidden_size")
    heads = _int(config, "num_attention_heads")
    head_dim = int(config.get("head_dim") or hidden // heads)
    layers = adapter.config_shapes(config)
    if head_dim % 2:
        raise SurgeonError(f"head_dim {head_dim} is odd; RoPE needs an even head size")

    if len(set(layers)) > 1:
        sizes = sorted({(s.intermediate_size, s.num_attention_heads, s.num_key_value_heads) for s in layers})
        per_layer = adapter.gguf_per_layer
        if uniform:
            raise SurgeonError(
                f"uniform GGUF needs the same sizes in every layer; (MLP width, heads, KV heads) here: {sizes} "
                "(shrink with --uniform first, or drop --uniform to write llama.cpp's per-layer 'deci' architecture)"
            )
        if per_layer is None:
            raise SurgeonError(
                f"per-layer {stock} shapes cannot be written for llama.cpp: its '{target.name}' architecture "
                f"creates every layer with layer 0's sizes; (MLP width, heads, KV heads) here: {sizes}; "
                "shrink with --uniform so every layer has the same sizes"
            )
        lacking = sorted(set(target.layer_tensors) - set(per_layer.layer_tensors + per_layer.optional_tensors))
        if lacking:
            raise SurgeonError(
                f"per-layer {stock} shapes cannot be written for llama.cpp: its per-layer architecture "
                f"'{per_layer.name}' has no {lacking[0].lower()}; shrink with --uniform so every layer has the "
                "same sizes"
            )
        target = per_layer

    full, sliding_rope = _rope_parameters(config)
    rope_type = _rope_type(full)
    if rope_type not in ("default", "linear", "llama3") or (rope_type == "llama3" and not target.rope_freqs):
        raise SurgeonError(f"RoPE scaling {rope_type!r} is not supported by the GGUF writer yet "
                           "(supported: default, linear; llama3 for Llama)")
    theta = float(full.get("rope_theta", config.get("rope_theta", 10000.0)))
    model = _Model(
        model_type=model_type, target=target, hidden=hidden, head_dim=head_dim,
        vocab_size=_int(config, "vocab_size"),
        context_length=_int(config, "max_position_embeddings"),
        rms_eps=float(config.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_type=rope_type,
        rope=full, layers=layers, tied=bool(config.get("tie_word_embeddings", False)), norm_offset=adapter.norm_offset,
    )
    if not target.output_tensor and not model.tied:
        raise SurgeonError(f"llama.cpp's '{target.name}' always uses the embeddings as the LM head, but "
                           "config.json says tie_word_embeddings is false")
    _describe_sliding(model, config, sliding_rope)
    _describe_scales(model, config)
    return model


def _rope_parameters(config: dict) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """RoPE settings of the full-attention layers, and of the sliding ones where the config sets their own
    (transformers 5: ``rope_parameters`` keyed by layer type; 4.x Gemma3: ``rope_local_base_freq``)."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise SurgeonError(f"config rope_parameters must be a mapping, got {rope!r}")
    full = rope.get("full_attention", rope)
    sliding = rope.get("sliding_attention")
    if sliding is None and config.get("rope_local_base_freq") is not None:
        sliding = {"rope_type": "default", "rope_theta": config["rope_local_base_freq"]}
    if not isinstance(full, dict) or not isinstance(sliding, (dict, type(None))):
        raise SurgeonError(f"config rope_parameters must map layer types to mappings, got {rope!r}")
    full = dict(full)
    if "original_max_position_embeddings" in config:
        full.setdefault("original_max_position_embeddings", config["original_max_position_embeddings"])
    return full, sliding


def _rope_type(rope: dict[str, Any]) -> str:
    return str(rope.get("rope_type") or rope.get("type") or "default")


def _describe_sliding(m: _Model, config: dict, sliding_rope: dict[str, Any] | None) -> None:
    """Which layers slide, their window and RoPE base, as the architecture reads them (llama.cpp's
    ``load_swa_pattern``: an array ``attention.sliding_window_pattern`` of one flag per layer)."""
    period, n = m.target.swa_period, len(m.layers)
    if not period:
        return
    types = config.get("layer_types")
    if types is None:  # configs before transformers wrote layer_types: the family's own period (= llama.cpp's)
        period = int(config.get("sliding_window_pattern") or config.get("_sliding_window_pattern") or period)
        types = ["full_attention" if i % period == period - 1 else "sliding_attention" for i in range(n)]
    if not isinstance(types, list) or len(types) != n \
            or not set(types) <= {"sliding_attention", "full_attention"}:
        raise SurgeonError(f"config layer_types must list sliding_attention or full_attention for each of the {n} "
                           f"layers (llama.cpp's '{m.arch}' has no other attention), got {types!r}")
    m.sliding = [t == "sliding_attention" for t in types]
    if not any(m.sliding):
        return
    window = config.get("sliding_window")
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise SurgeonError(f"config sliding_window must be a positive integer for sliding layers, got {window!r}")
    m.sliding_window = window
    rope = sliding_rope if sliding_rope is not None else m.rope
    m.rope_theta_swa = float(rope.get("rope_theta", m.rope_theta))
    # llama.cpp scales the sliding layers' RoPE like the others (gemma2) or not at all (gemma3).
    want = (_rope_type(m.rope), m.rope.get("factor")) if m.target.swa_rope_scaled else ("default", None)
    if (_rope_type(rope), rope.get("factor") if _rope_type(rope) != "default" else None) != want:
        raise SurgeonError(f"llama.cpp's '{m.arch}' cannot give sliding layers the RoPE scaling {rope!r} "
                           f"(its sliding layers use {want[0]} RoPE{'' if want[1] is None else f' x{want[1]}'})")


def _describe_scales(m: _Model, config: dict) -> None:
    """Soft-capping values, and the query scale llama.cpp cannot take as a setting (folded into a tensor)."""
    target = m.target
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        value = config.get(key)
        if value is None:
            if target.softcaps_always and key in target.softcaps:
                raise SurgeonError(f"llama.cpp's '{m.arch}' always soft-caps with {key}, but config.json has none")
            continue
        if key not in target.softcaps:
            raise SurgeonError(f"llama.cpp's '{m.arch}' has no {key} (config.json sets {value})")
        m.softcaps[key] = float(value)
    # Hugging Face scales q.k by query_pre_attn_scalar ** -0.5 (head_dim ** -0.5 without it); llama.cpp's
    # gemma2/gemma3 by 1/sqrt(head_dim), or 1/sqrt(hidden // heads) at their 27B layer count
    # (load_arch_hparams, f_attention_scale; integer division in C++).
    ours = float(config.get("query_pre_attn_scalar") or m.head_dim) ** -0.5
    if target.wide_scale_layers and len(m.layers) == target.wide_scale_layers:
        theirs = float(m.hidden // m.layers[0].num_attention_heads) ** -0.5
    else:
        theirs = float(m.head_dim) ** -0.5
    m.q_scale = ours / theirs
    if m.q_scale != 1.0 and target.q_scale_into is None:
        raise SurgeonError(f"llama.cpp's '{m.arch}' scales attention by 1/sqrt(head_dim) only; config.json's "
                           f"query_pre_attn_scalar {config.get('query_pre_attn_scalar')} cannot be written")


def _int(config: dict, key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SurgeonError(f"config.json: {key} missing or not a positive integer ({value!r})")
    return value


# --- tensors ------------------------------------------------------------------------------------


def _index(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """safetensors key -> (file, shape, dtype), from the headers only."""
    from safetensors import safe_open

    out: dict[str, tuple[Path, tuple[int, ...], str]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 (a safetensors handle is not iterable)
                sl = st.get_slice(key)
                out[key] = (f, tuple(sl.get_shape()), str(sl.get_dtype()))
    return out


# Per-layer tensor kinds in the order they are written.
_LAYER_ORDER = ("ATTN_NORM", "ATTN_Q", "ATTN_K", "ATTN_V", "ATTN_OUT", "ATTN_Q_NORM", "ATTN_K_NORM", "ATTN_POST_NORM",
                "FFN_NORM", "FFN_PRE_NORM", "FFN_GATE", "FFN_UP", "FFN_DOWN", "FFN_POST_NORM")


def _expected_shape(kind: str, suffix: str, m: _Model, s: LayerShape) -> tuple[int, ...]:
    """The Hugging Face shape of one layer tensor, from config.json."""
    q, kv, hd, h, ff = s.num_attention_heads * m.head_dim, s.num_key_value_heads * m.head_dim, m.head_dim, m.hidden, \
        s.intermediate_size
    weights = {
        "ATTN_NORM": (h,), "FFN_NORM": (h,), "ATTN_POST_NORM": (h,), "FFN_PRE_NORM": (h,), "FFN_POST_NORM": (h,),
        "ATTN_Q_NORM": (hd,), "ATTN_K_NORM": (hd,),
        "ATTN_Q": (q, h), "ATTN_K": (kv, h), "ATTN_V": (kv, h), "ATTN_OUT": (h, q),
        "FFN_GATE": (ff, h), "FFN_UP": (ff, h), "FFN_DOWN": (h, ff),
    }
    return weights[kind] if suffix == "weight" else weights[kind][:1]


def _plan_tensors(m: _Model, sources: dict[str, tuple[Path, tuple[int, ...], str]], qtype: Any) -> list[_Tensor]:
    """Every tensor to write, checked against config.json and against what llama.cpp reads."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[m.arch.upper()], len(m.layers))
    required = {tuple(k.split(".")) for k in m.target.layer_tensors}
    allowed = required | {tuple(k.split(".")) for k in m.target.optional_tensors}
    offset = m.norm_offset
    layer_tensors: list[dict[tuple[str, str], _Tensor]] = [{} for _ in m.layers]
    globals_: dict[str, _Tensor] = {}
    for key, (_, shape, dtype) in sorted(sources.items()):
        if key.endswith("rotary_emb.inv_freq"):
            continue  # recomputed by every runtime from rope_theta
        if key == "lm_head.weight" and m.tied:
            continue  # tied: llama.cpp reuses token_embd when output.weight is absent
        if dtype not in ("F32", "F16", "BF16", "F64"):
            raise SurgeonError(f"tensor {key} is stored as {dtype}; GGUF export reads floating-point weights only")
        found = names.get_type_and_name(key, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise SurgeonError(f"tensor {key} has no llama.cpp '{m.arch}' name; GGUF export cannot place it")
        kind, gguf_name = found[0].name, found[1]
        suffix = gguf_name.rsplit(".", 1)[-1]
        bid = _block_id(gguf_name)
        if bid is None:
            if (kind, suffix) not in (("TOKEN_EMBD", "weight"), ("OUTPUT_NORM", "weight"), ("OUTPUT", "weight")):
                raise SurgeonError(f"tensor {key} ({gguf_name}) is not read by llama.cpp's '{m.arch}' architecture")
            want = (m.hidden,) if kind == "OUTPUT_NORM" else (m.vocab_size, m.hidden)
            _check_shape(key, shape, want)
            globals_[kind] = _Tensor(gguf_name, key, shape, _out_type(gguf_name, shape, qtype),
                                     offset=offset if kind == "OUTPUT_NORM" else 0.0)
            continue
        if bid >= len(m.layers):
            raise SurgeonError(f"tensor {key} is in layer {bid}, but config.json has {len(m.layers)} layers")
        if (kind, suffix) not in allowed:
            raise SurgeonError(f"tensor {key} ({gguf_name}) is not read by llama.cpp's '{m.arch}' architecture")
        sizes = m.layers[bid]
        _check_shape(key, shape, _expected_shape(kind, suffix, m, sizes))
        if (kind, suffix) in (("ATTN_Q", "bias"), ("ATTN_OUT", "bias")) and shape[0] != m.hidden:
            raise SurgeonError(
                f"layer {bid}: llama.cpp's '{m.arch}' reads {gguf_name} with hidden_size ({m.hidden}) entries, but "
                f"{sizes.num_attention_heads} heads x {m.head_dim} give {shape[0]}; shrink without removing query "
                "heads, or with --uniform"
            )
        if m.target.square_q and kind in ("ATTN_Q", "ATTN_OUT") and sizes.num_attention_heads * m.head_dim != m.hidden:
            raise SurgeonError(
                f"llama.cpp's '{m.arch}' needs heads x head_dim = hidden_size ({m.hidden}), got "
                f"{sizes.num_attention_heads} x {m.head_dim}; {stock_model_type(m.model_type)} with removed query "
                "heads has no llama.cpp layout"
            )
        pad = m.ffn_width(sizes) - sizes.intermediate_size
        if kind in ("FFN_GATE", "FFN_UP") and pad:  # rows (and bias entries) are MLP channels
            extra, shape = (pad, 0), (shape[0] + pad, *shape[1:])
        elif kind == "FFN_DOWN" and suffix == "weight" and pad:  # columns are MLP channels
            extra, shape = (0, pad), (shape[0], shape[1] + pad)
        else:
            extra = (0, 0)
        heads = 0
        if m.permute_qk and kind == "ATTN_Q":
            heads = sizes.num_attention_heads
        elif m.permute_qk and kind == "ATTN_K":
            heads = sizes.num_key_value_heads
        norm = kind.endswith("_NORM")  # every RMSNorm weight: llama.cpp computes x * w, Gemma x * (1 + w)
        layer_tensors[bid][(kind, suffix)] = _Tensor(
            gguf_name, key, shape, _out_type(gguf_name, shape, qtype), heads, pad=extra,
            offset=offset if norm else 0.0, scale=m.q_scale if (kind, suffix) == (m.target.q_scale_into, "weight") else 1.0,
        )

    for name in ("TOKEN_EMBD", "OUTPUT_NORM"):
        if name not in globals_:
            raise SurgeonError(f"the checkpoint has no {'embedding' if name == 'TOKEN_EMBD' else 'final norm'} tensor")
    if not m.tied and "OUTPUT" not in globals_:
        raise SurgeonError("config.json says the LM head is not tied, but lm_head.weight is missing")
    for i, have in enumerate(layer_tensors):
        missing = sorted(f"{k.lower()}.{s}" for k, s in required - set(have))
        if missing:
            raise SurgeonError(
                f"layer {i}: tensor {missing[0]} missing from the checkpoint (llama.cpp '{m.arch}' needs it)"
            )

    out = [globals_["TOKEN_EMBD"]]
    if m.rope_type == "llama3":
        out.append(_rope_freqs(m))
    for have in layer_tensors:
        out.extend(have[k] for k in sorted(have, key=lambda k: (_LAYER_ORDER.index(k[0]), k[1] == "bias")))
    out.append(globals_["OUTPUT_NORM"])
    if "OUTPUT" in globals_:
        out.append(globals_["OUTPUT"])
    return out


def _block_id(gguf_name: str) -> int | None:
    parts = gguf_name.split(".")
    return int(parts[1]) if parts[0] == "blk" else None


def _check_shape(key: str, shape: tuple[int, ...], want: tuple[int, ...]) -> None:
    if tuple(shape) != tuple(want):
        raise SurgeonError(f"tensor {key} has shape {list(shape)}, but config.json says {list(want)}")


def _out_type(gguf_name: str, shape: tuple[int, ...], qtype: Any) -> Any:
    """convert_hf_to_gguf's rule: 1-D tensors and norms in F32; Q8_0 needs rows in blocks of 32 (else F16)."""
    import gguf

    if len(shape) <= 1 or gguf_name.endswith("_norm.weight"):
        return gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.Q8_0 and shape[-1] % Q8_0_BLOCK:
        return gguf.GGMLQuantizationType.F16
    return qtype


def _rope_freqs(m: _Model) -> _Tensor:
    """Llama 3 RoPE frequency factors (convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors)."""
    import gguf

    r = m.rope
    base, dim = m.rope_theta, m.head_dim
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = r.get("factor", 8.0), r.get("low_freq_factor", 1.0), r.get("high_freq_factor", 4.0)
    old_context = r.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    data = torch.tensor(factors, dtype=torch.float32)
    return _Tensor("rope_freqs.weight", "", tuple(data.shape), gguf.GGMLQuantizationType.F32, data=data)


def permute_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face rotate-half rows -> llama.cpp NORM RoPE rows (convert_hf_to_gguf.py, LlamaModel.permute).

    Within each head, row ``j`` of the first half and row ``j`` of the second half (one rotated pair
    in Hugging Face's layout) become rows ``2j`` and ``2j+1`` (one pair for ggml's NORM rope).
    """
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@contextlib.contextmanager
def _open_all(files: list[Path]) -> Iterator[dict[Path, Any]]:
    from safetensors import safe_open

    with contextlib.ExitStack() as stack:
        yield {f: stack.enter_context(safe_open(str(f), framework="pt")) for f in files}


def _encode(t: _Tensor, sources: dict[str, tuple[Path, tuple[int, ...], str]], handles: dict[Path, Any]) -> np.ndarray:
    """The tensor's bytes as GGUF stores them (numpy, row-major, little-endian)."""
    import gguf

    if t.data is not None:
        data = t.data
    else:
        path = sources[t.source][0]
        data = handles[path].get_tensor(t.source)
        check_finite([(t.source, data)], path)  # NaN or infinity: refused, as every other exporter does
    if t.offset or t.scale != 1.0:  # in float32, as Hugging Face computes 1 + w and llama.cpp reads F32 norms
        data = (data.to(torch.float32) + t.offset) * t.scale
    if t.permute_heads:
        data = permute_qk(data, t.permute_heads)
    rows, cols = t.pad
    if rows:  # zero MLP channels appended (FFN_ALIGN)
        data = torch.cat([data, data.new_zeros(rows, *data.shape[1:])])
    if cols:
        data = torch.cat([data, data.new_zeros(data.shape[0], cols)], dim=1)
    kind = t.qtype.name
    if kind == "F32":
        return data.to(torch.float32).contiguous().numpy()
    if kind == "F16":
        return data.to(torch.float16).contiguous().numpy()
    if kind == "BF16":  # the same round-to-nearest-even as ggml_compute_fp32_to_bf16
        return data.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)
    return gguf.quants.quantize(data.to(torch.float32).contiguous().numpy(), t.qtype)


# --- metadata -----------------------------------------------------------------------------------


def _write_metadata(writer: Any, m: _Model, vocab: GgufVocab, qtype: Any, name: str) -> None:
    """TextModel/LlamaModel/DeciModel.set_gguf_parameters, then the vocabulary (_set_vocab_gpt2)."""
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(len(m.layers))
    writer.add_context_length(m.context_length)
    writer.add_embedding_length(m.hidden)
    if m.per_layer:
        writer.add_feed_forward_length([m.ffn_width(s) for s in m.layers])
        writer.add_head_count([s.num_attention_heads for s in m.layers])
        writer.add_head_count_kv([s.num_key_value_heads for s in m.layers])
    else:
        writer.add_feed_forward_length(m.ffn_width(m.layers[0]))
        writer.add_head_count(m.layers[0].num_attention_heads)
        writer.add_head_count_kv(m.layers[0].num_key_value_heads)
    if m.padded:  # llama.cpp ignores it; base.loading cuts the zero channels back off
        writer.add_array(GGUF_TRUE_FFN_KEY, [s.intermediate_size for s in m.layers])
    writer.add_rope_freq_base(m.rope_theta)
    if m.target.swa_period:  # one flag per layer (llama.cpp's load_swa_pattern reads the array as it is)
        writer.add_sliding_window_pattern(m.sliding)
        if any(m.sliding):
            writer.add_sliding_window(m.sliding_window)
            writer.add_rope_freq_base_swa(m.rope_theta_swa)
    for key, value in m.softcaps.items():  # gguf's keys are named like Hugging Face's
        writer.add_float32(f"{m.arch}.{key}", value)
    if m.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(m.rope["factor"]))
    writer.add_layer_norm_rms_eps(m.rms_eps)
    writer.add_key_length(m.head_dim)
    writer.add_value_length(m.head_dim)
    writer.add_rope_dimension_count(m.head_dim)
    writer.add_vocab_size(m.vocab_size)
    writer.add_file_type(_file_type(qtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_vocab(writer, vocab)


def read_gguf_metadata(path: Path | str) -> dict[str, Any]:
    """Every key of a GGUF file with its value (arrays as lists), for checks and ``info``."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


__all__: list[str] = [
    "FFN_ALIGN", "TENSOR_TYPES", "check_gguf_target", "export_gguf", "permute_qk",
    "read_gguf_metadata",
]
