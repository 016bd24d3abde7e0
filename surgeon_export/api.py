"""The Python API: what the ``surgeon-export`` commands do, one function each, in a few lines.

Example (load, prune, save smaller, export, bench)::

    import surgeon_export as se

    lm = se.load()                                                    # the default model
    report = se.prune(lm, se.build_config("surgeon", structured=0.8))  # LLM Surgeon, 80% kept
    se.save(lm, "small", report)                                      # physically smaller checkpoint
    se.export_onnx(se.load("small"), "small-onnx")                    # ONNX with KV cache, parity-checked
    result = se.bench(se.BenchConfig([se.ModelSpec("dense", None), se.ModelSpec("small", "small")]),
                      "bench.json")

Every function takes and returns plain objects: a :class:`LoadedModel`, a pruning config
(:func:`build_config`, or :class:`SurgeonConfig` / :class:`PruneConfig` / :class:`SDSConfig`
directly), a :class:`PruneReport`, result dicts. User mistakes raise :class:`SurgeonError`.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from base import distributed as dist
from base.adapters import Adapter
from base.data import TokenSource, calibration_windows, check_window, eval_tokens
from base.errors import SurgeonError, check_choice
from base.files import check_free_disk, check_writable, interrupted_message, resumable, write_file
from base.formats import REPORT_FILE
from base.integrity import source_identity
from base.lazy import LazyModel, open_lazy
from base.loading import (
    LoadedModel,
    count_parameters,
    load_model,
    resolve_model_dir,
    weight_files,
)
from base.perplexity import Perplexity, perplexity
from base.surgery import RemovalPlan
from benchmarks.gate import gate_table, parse_tolerance
from benchmarks.report import markdown
from benchmarks.run import BenchConfig, ModelSpec, PplConfig, parse_batches, parse_models, parse_prefill, resolve_device
from benchmarks.run import bench as _bench
from export.card import add_measurements, benchmark_lines
from export.checkpoint import prepare_target, save_checkpoint
from export.gguf import FFN_ALIGN, check_gguf_target
from export.gguf import export_gguf as _export_gguf
from export.onnx import OnnxConfig
from export.onnx import export_onnx as _export_onnx
from export.pruned import ShrinkConfig, shrink_and_save
from export.sparse_checkpoint import PackConfig, densify, pack_checkpoint
from export.streaming import StreamedLayers, partial_dir
from runtime.backend import backend_python, load_backend
from runtime.generate import (
    Generation,
    GenerationConfig,
    encode_prompts,
    eos_ids,
    generate,
)
from surgeon.api import (
    Config,
    build_config,
    calibration_size,
    check_model,
    check_streamable,
    needs_calibration,
    prune_,
)
from surgeon.calibrate import layerwise_differences
from surgeon.driver import PruneConfig, PruneReport
from surgeon.llm_surgeon import SurgeonConfig
from surgeon.recover import RecoverConfig, RecoverReport, recover_
from surgeon.sds import SDSConfig
from surgeon.streamed_surgeon import spill_bytes

log = logging.getLogger("surgeon_export")

__all__ = [
    "BenchConfig", "Generation", "GenerationConfig", "LoadedModel", "ModelSpec", "OnnxConfig", "PackConfig",
    "PplConfig", "PruneConfig", "PruneReport", "RecoverConfig", "RecoverReport", "RunConfig", "SDSConfig", "ShrinkConfig", "SurgeonConfig",
    "SurgeonError", "bench", "build_config", "calibrate", "check_ranks", "densify", "evaluate", "export_gguf", "export_onnx", "generate",
    "load", "load_backend", "pack", "prune", "recover", "recovery_windows", "run", "save", "shrink",
]


def load(spec: str | Path | None = None, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LoadedModel:
    """A model directory, a ``.gguf`` file, or ``None`` for the default model (:func:`base.loading.load_model`)."""
    return load_model(spec, dtype=dtype, device=device)


def evaluate(
    lm: LoadedModel, *, text: str | Path | None = None, data_dir: str | Path | None = None, seq_len: int = 512,
    windows: int | None = 64, batch_size: int = 4, progress: bool = False,
) -> tuple[Perplexity, str]:
    """Protocol perplexity (WikiText-2 test unless ``text``; ``windows=None``: every window) and the text's origin."""
    if (windows is not None and windows < 1) or batch_size < 1:
        raise SurgeonError("--windows and --batch-size must be at least 1")
    check_window(seq_len, lm.model.config)
    tokens = eval_tokens(lm.tokenizer, text, data_dir)
    result = perplexity(lm.model, tokens.ids, seq_len=seq_len, max_windows=windows, batch_size=batch_size,
                        progress=progress, bos=tokens.bos)
    return result, tokens.origin


def evaluate_model(
    spec: str | Path | None = None, *, text: str | Path | None = None, data_dir: str | Path | None = None,
    seq_len: int = 512, windows: int | None = 64, batch_size: int = 4, progress: bool = False,
) -> dict:
    """The ``eval`` command: load ``spec`` and :func:`evaluate` it; the perplexity with the model, the text,
    the parameter counts, the seconds taken and the environment."""
    from base.env import environment

    start = time.perf_counter()
    lm = load(spec)
    result, origin = evaluate(lm, text=text, data_dir=data_dir, seq_len=seq_len, windows=windows,
                              batch_size=batch_size, progress=progress)
    return {"model": lm.source, "text": origin, **result.to_dict(),
            "parameters": count_parameters(lm.model, lm.adapter),
            "seconds": round(time.perf_counter() - start, 2), "environment": environment()}


def info(spec: str | Path | None = None) -> dict:
    """The ``info`` command: architecture, per-layer shapes (read from the linears: they may differ per
    layer), parameter counts and measured zeros of a model."""
    from base.surgery import layer_shapes

    lm = load(spec)
    config = lm.model.config
    shapes = layer_shapes(lm.model, lm.adapter)
    return {"model": lm.source, "path": str(lm.path), "model_type": config.model_type,
            "layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
            "intermediate_size": max(s.intermediate_size for s in shapes),
            "num_attention_heads": max(s.num_attention_heads for s in shapes),
            "num_key_value_heads": max(s.num_key_value_heads for s in shapes),
            "layer_shapes": [s.to_dict() for s in shapes], "vocab_size": config.vocab_size,
            "parameters": count_parameters(lm.model, lm.adapter)}


def launched_ranks() -> tuple[int, int]:
    """How this process was launched: (ranks, this rank) from torchrun's environment; (1, 0) alone."""
    import os

    return dist.env_world_size(), int(os.environ.get("RANK", "0") or 0)


def set_threads(threads: int | None) -> None:
    """CPU threads for torch (None: torch's choice)."""
    if threads is None:
        return
    if threads < 1:
        raise SurgeonError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)


def shutdown_distributed() -> None:
    """Leave torchrun's process group, if this process joined one."""
    dist.shutdown()


def calibrate(
    lm: LoadedModel, n: int, *, seq_len: int = 512, seed: int = 0, text: str | Path | None = None,
    data_dir: str | Path | None = None,
) -> TokenSource:
    """``n`` calibration windows of ``seq_len`` tokens (WikiText-2 validation unless ``text``; seeded offsets)."""
    return calibration_windows(lm.model, lm.tokenizer, n=n, seq_len=seq_len, seed=seed, text_file=text,
                               data_dir=data_dir)


def prune(
    lm: LoadedModel, config: Config, *, calibration: TokenSource | None = None, calib_samples: int | None = None,
    seq_len: int = 512, seed: int = 0, calib_text: str | Path | None = None, data_dir: str | Path | None = None,
    checkpoint: Path | None = None, progress: bool = False, bos_statistics: str = "include",
) -> PruneReport:
    """Prune ``lm.model`` in place as ``config`` says (:func:`surgeon.api.prune_`), calibrating first if needed.

    ``calibration`` given windows; else ``calib_samples`` windows (default: the config's,
    :func:`surgeon.api.calibration_size`) from ``calib_text`` or the corpus. The report's
    ``calibration`` key says where they came from. ``bos_statistics``: where the windows lead with BOS,
    ``"include"`` its position in the calibration statistics (the default: measured better, docs/llm_surgeon.md
    "BOS") or ``"exclude"`` it.

    Launched with ``torchrun`` (several ranks), every rank calls it alike: the ranks first check
    that they hold the same model, config and windows, then prune data-parallel and end with the
    same weights; ``report.distributed`` has each rank's time, peak memory and time in collectives.
    """
    init_distributed()
    check_model(lm.model, lm.adapter, config)  # before calibration: a bad target fails at once
    check_choice("--bos-statistics", bos_statistics, ("include", "exclude"))
    if checkpoint is not None and dist.is_main():
        check_writable(Path(checkpoint) / "progress.json", "--checkpoint")
    if calibration is None:
        calibration = _calibration(lm.model, lm.tokenizer, config, calib_samples, seq_len=seq_len, seed=seed,
                                   text=calib_text, data_dir=data_dir, held=True)
    check_ranks(lm.path, config, calibration)
    binding = None
    if checkpoint is not None:  # a resumed run must continue the same model with the same calibration
        binding = {"source model": source_identity(lm.path / "config.json", weight_files(lm.path)),
                   "seed": seed, "calibration": calibration.origin if calibration else None,
                   "bos_statistics": bos_statistics}
    return _prune_recorded(lm.model, lm.adapter, calibration, config, bos_statistics,
                           checkpoint_dir=checkpoint, binding=binding, progress=progress)


def _calibration(model: torch.nn.Module, tokenizer: object, config: Config, n: int | None, *, seq_len: int,
                 seed: int, text: str | Path | None, data_dir: str | Path | None, held: bool) -> TokenSource | None:
    """The calibration windows of a prune, one path for whole-model and streamed runs: ``n`` (default: the
    config's, :func:`surgeon.api.calibration_size`) windows of ``text`` or the corpus, None where the config
    reads none. A model ``held`` whole samples its own text where no corpus is found; a streamed one (one
    layer in memory) cannot, and says so."""
    if not needs_calibration(config):
        return None
    n = n if n is not None else calibration_size(config)
    if n < 1:
        raise SurgeonError(f"--calib-samples must be at least 1, got {n}")
    try:
        return calibration_windows(model, tokenizer, n=n, seq_len=seq_len, seed=seed, text_file=text,
                                   data_dir=data_dir, source="auto" if held else "wikitext")
    except SurgeonError as exc:
        if held or text is not None:
            raise
        raise SurgeonError(f"{exc}: a streamed run holds one layer, so it cannot sample calibration text from the "
                           "model itself; give --calib-text FILE (or --data-dir), or prune with --no-streaming") from None


def _prune_recorded(model: torch.nn.Module, adapter: Adapter, calibration: TokenSource | None, config: Config,
                    bos_statistics: str, **kwargs: Any) -> PruneReport:
    """:func:`surgeon.api.prune_` on ``calibration``'s windows, the report told where they came from, whether
    they lead with BOS and what the statistics did with it, and (under torchrun) each rank's figures."""
    report = prune_(model, adapter, calibration.ids if calibration else None, config,
                    leading_bos=_leading_bos(calibration, bos_statistics), **kwargs)
    report.calibration = calibration.origin if calibration else None
    report.bos = calibration.bos is not None if calibration else None
    report.bos_statistics = bos_statistics
    if dist.active():
        report.distributed = dist.rank_report(report.seconds)
    return report


def init_distributed(timeout: float | None = None) -> bool:
    """Join torchrun's process group if this process is one of several (``WORLD_SIZE`` > 1); idempotent.

    :func:`prune` and :func:`prune_streamed` call it, so a script launched with ``torchrun`` prunes
    data-parallel as it is (docs/distributed.md); call it first to set the collectives' ``timeout``
    (seconds). Returns whether a process group of several ranks is active.
    """
    several = dist.init_from_env(timeout)
    if several:
        dist.reset_stats()  # the report counts this prune's collectives
    return several


def check_ranks(source_dir: Path, config: Config, calibration: TokenSource | None) -> None:
    """Every rank must prune the same model with the same config and calibration windows (one line on
    every rank otherwise, naming what differs); nothing happens with one process."""
    if not dist.active():
        return
    from base.env import _version

    tokens = calibration.ids.to(torch.int64).contiguous().numpy().tobytes() if calibration is not None else b""
    dist.check_same({
        "model": source_identity(source_dir / "config.json", weight_files(source_dir)),
        "pruning config": dist.digest(config.to_dict()),
        "calibration windows": dist.digest(tokens),
        "software versions": dist.digest([_version("surgeon-export"), torch.__version__]),
    })


RECOVER_DATA = ("calibration", "generated")


def recovery_windows(
    lm: LoadedModel, n: int = 256, *, seq_len: int = 256, data: str = "calibration", seed: int = 1,
    calib_text: str | Path | None = None, data_dir: str | Path | None = None,
) -> TokenSource:
    """Training windows for :func:`recover`: ``calibration`` text (WikiText-2 validation or ``calib_text``;
    never the evaluation split; seeded offsets, by default another seed than pruning's 0) or text the
    dense model ``generated`` itself (data-free). Take them before pruning (``lm`` is the dense model)."""
    check_choice("--recover-data", data, RECOVER_DATA)
    if n < 1:
        raise SurgeonError(f"--recover-windows must be at least 1, got {n}")
    return calibration_windows(lm.model, lm.tokenizer, n=n, seq_len=seq_len, seed=seed, text_file=calib_text,
                               data_dir=data_dir, source="generated" if data == "generated" else "wikitext")


def recover(
    lm: LoadedModel, teacher: LoadedModel, config: RecoverConfig | None = None, *,
    windows: TokenSource | None = None, masks: dict[str, torch.Tensor] | None = None,
    checkpoint: Path | None = None, progress: bool = False,
) -> RecoverReport:
    """Distil the pruned ``lm`` from the dense ``teacher`` in place, its pruned structure frozen (:mod:`surgeon.recover`).

    ``windows``: from :func:`recovery_windows` (default: 256 calibration windows of the config's
    length). ``masks`` (default: the nonzero weights) are what may change.
    """
    config = config or RecoverConfig()
    if lm.model.config.vocab_size != teacher.model.config.vocab_size:
        raise SurgeonError(f"the teacher's vocabulary ({teacher.model.config.vocab_size}) differs from the pruned "
                           f"model's ({lm.model.config.vocab_size}): distillation needs the same tokens")
    windows = windows or recovery_windows(teacher, seq_len=config.seq_len or 512)
    return recover_(lm.model, teacher.model, lm.adapter, windows.ids, config, masks=masks, checkpoint_dir=checkpoint,
                    progress=progress, data=windows.origin)


def needs_head(config: Config) -> bool:
    """Whether a streamed prune with ``config`` computes logits (LLM Surgeon's K-FAC gradients), so needs the LM head
    in memory; the layer-wise methods do not."""
    return isinstance(config, SurgeonConfig)


WHOLE_MODEL_FACTOR = {"layerwise": 5.0, "surgeon": 18.0}  # measured peak RSS / float32 weights (docs/streaming.md)
PROCESS_BYTES = 500 * 2**20  # the CLI process with its imports (torch, transformers: 0.4 GiB; measured 505 MiB on tiny models)
TOKENIZER_BYTES = 1024  # a fast tokenizer in memory, per vocabulary entry (measured: 45 MiB at 49,152, 0.25 GiB at 262,144)


@dataclass
class MemoryPlan:
    """What a prune needs: the whole model in memory, or one layer at a time (bytes), and what is free."""

    whole: int
    streamed: int
    available: int | None
    streaming: bool
    reason: str
    outside: int = 0  # of ``streamed``: the tensors outside the decoder layers held in memory (bytes)
    terms: dict[str, int] = field(default_factory=dict)  # the parts of ``streamed`` (memory_plan's docstring)
    lazy: LazyModel | None = field(default=None, repr=False)  # the model the plan was made for (prune_job)


def parse_bytes(text: str) -> int:
    """``"8GiB"``, ``"512MiB"``, ``"2.5GB"`` or a plain number of bytes."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if match is None or match[2].lower() not in units:
        raise SurgeonError(f"--max-memory must be a size such as 8GiB or 512MiB, got {text!r}")
    return int(float(match[1]) * units[match[2].lower()])


def memory_plan(lazy: LazyModel, config: Config, windows: int, seq_len: int, *, streaming: bool | None = None,
                max_memory: int | None = None) -> MemoryPlan:
    """Whole-model against streamed memory for this prune, and the choice (``streaming`` None: automatic).

    Whole model: the process (:data:`PROCESS_BYTES`) and the float32 weights times the measured factor of
    the method family. Streamed, the peak of the run's steps (``terms``, bytes; docs/streaming.md):

    - always: the ``process`` and the ``tokenizer`` (:data:`TOKENIZER_BYTES` per vocabulary entry);
    - ``outside``: the float32 tensors outside the decoder layers the run holds (the embeddings; LLM
      Surgeon's LM head, the same tensor when tied; whatever else the caller loaded), and ``reading``:
      the largest of them in the source's dtype, whose file pages count while it is converted;
    - ``boundary``: the layer-boundary activations of every window, float32 (held once: each batch's input
      is freed as its output is made; twice with SDS; LLM Surgeon's forward walk: in and out);
    - the layer step: ``layer`` (twice: SDS's dense copy; LLM Surgeon's recomputed layer), ``statistics``
      (Wanda: the diagonals of ``A``; SparseGPT and SDS: every input group's ``A`` in float64 and two more
      matrices of the widest for its factorisation; LLM Surgeon: one layer's K-FAC factors in float64,
      three times over) and ``activations`` (one forward batch's; LLM Surgeon's K-FAC batch); LLM
      Surgeon also ``head``: the LM head's chunk of logits (:data:`surgeon.calibrate.HEAD_CHUNK`, or a K-FAC batch's), its
      softmax and gradients;
    - ``writing``: the end, the tensors outside the layers copied from the source in its dtype, with
      their file pages (the float32 ones are released first).

    Layer-wise methods release the embeddings once the first layer's inputs are taken, so the peak is
    ``process + tokenizer + max(outside + max(reading, boundary), layer step + boundary, writing)``;
    LLM Surgeon keeps them (the head) for the whole walk: ``process + tokenizer + max(outside +
    max(reading, boundary + layer step + head), writing)``. Measured against it:
    benchmarks/results/memory_plan.md (within 25% on the default model, the tiny model of every family
    and Gemma3-270m's shapes).
    """
    model, adapter = lazy.model, lazy.adapter
    layer = adapter.decoder_layers(model)[0]
    layer_bytes = 4 * sum(p.numel() for p in layer.parameters())
    rest = {n: p for n, p in model.named_parameters() if not n.startswith(adapter.layers + ".")}
    total = 4 * sum(p.numel() for p in rest.values()) + layer_bytes * lazy.num_layers()
    surgeon = isinstance(config, SurgeonConfig)
    output = model.get_output_embeddings()
    untied = output is not None and not getattr(model.config, "tie_word_embeddings", False)
    left = output.weight if untied and not surgeon else None  # a layer-wise run leaves an untied head on disk ...
    held = [p for p in rest.values() if p is not left or not p.is_meta]  # ... unless the caller loaded it
    outside = 4 * sum(p.numel() for p in held)
    source = lazy.weights.dtype().itemsize
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    terms = {"process": PROCESS_BYTES, "tokenizer": TOKENIZER_BYTES * vocab, "outside": outside,
             "reading": source * max((p.numel() for p in held), default=0),
             "writing": 2 * source * sum(p.numel() for p in rest.values())}
    whole = int(PROCESS_BYTES + total * WHOLE_MODEL_FACTOR["surgeon" if surgeon else "layerwise"])
    hidden = int(model.config.hidden_size)
    if surgeon:
        terms.update(_surgeon_streamed(lazy, config, windows, seq_len), layer=2 * layer_bytes)
        step = terms["boundary"] + terms["layer"] + terms["statistics"] + terms["activations"] + terms["head"]
        peak = max(outside + max(terms["reading"], step), terms["writing"])
    else:
        widest = max(m.in_features for m in adapter.decoder_linears(model).values())
        sds = 2 if getattr(config, "refine", None) is not None else 1
        inputs = [adapter.linear(layer, group[0]).in_features for group in adapter.input_groups]
        inter = adapter.linear(layer, adapter.channel_rows[0]).out_features
        terms.update(
            layer=layer_bytes * (1 + sds),
            statistics={"none": 0, "diagonal": 8 * sum(inputs),
                        "matrix": 8 * (sum(d * d for d in inputs) + 2 * widest**2)}[config.statistics],
            activations=4 * min(config.batch_size, windows) * seq_len * (4 * hidden + 3 * inter),  # q/k/v/o, MLP
            boundary=sds * 4 * windows * seq_len * hidden)
        step = terms["layer"] + terms["statistics"] + terms["activations"] + terms["boundary"]
        peak = max(outside + max(terms["reading"], terms["boundary"]), step, terms["writing"])
    streamed = int(terms["process"] + terms["tokenizer"] + peak)
    free = max_memory if max_memory is not None else available_memory()
    if max_memory is not None and max_memory < streamed:
        raise SurgeonError(f"--max-memory {_size(max_memory)} is below what one layer needs streamed "
                           f"({_size(streamed)}: the process, one layer, its statistics, {windows} x {seq_len} "
                           "activations and what lies outside the layers)")
    if streaming is not None:
        return MemoryPlan(whole, streamed, free, streaming, "--streaming" if streaming else "--no-streaming", outside,
                          terms)
    if free is None or whole <= free:
        return MemoryPlan(whole, streamed, free, False, "the whole model fits", outside, terms)
    return MemoryPlan(whole, streamed, free, True,
                      f"the whole model needs about {_size(whole)}, {_size(free)} "
                      f"{'allowed' if max_memory is not None else 'available'}", outside, terms)


def _surgeon_streamed(lazy: LazyModel, config: SurgeonConfig, windows: int, seq_len: int) -> dict[str, int]:
    """Streamed LLM Surgeon's terms besides the layer and the tensors outside the layers (bytes).

    ``statistics``: one layer's K-FAC factors in float64 (``A`` per shared input, ``G`` per linear; of o and
    down alone for structured output-side costs) three times over (the accumulators, and the rescaled, damped and inverted pair of the linears being
    pruned); ``boundary``: the forward walk's hidden states (in and out) of the windows it carries;
    ``activations``: one K-FAC batch's recomputed activations (hidden-sized tensors, the MLP's, the
    attention scores); ``head``: the LM head's chunk of logits with its softmax and gradient.
    """
    from surgeon.calibrate import HEAD_CHUNK

    model, adapter = lazy.model, lazy.adapter
    layer = adapter.decoder_layers(model)[0]
    used = list(adapter.linear_names)  # structured output-side shots collect G of o and down alone
    if config.structured is not None and config.pattern is None and config.group_cost == "output":
        used = [adapter.head_cols[0], adapter.channel_cols[0]]
    A = sum(adapter.linear(layer, g[0]).in_features ** 2 for g in adapter.input_groups if set(g) & set(used))
    G = sum(adapter.linear(layer, n).out_features ** 2 for n in used)
    hidden = int(model.config.hidden_size)
    inter = adapter.linear(layer, adapter.channel_rows[0]).out_features
    heads = adapter.head_layout(model.config)[0]
    carried = 0 if config.scoring == "magnitude" else windows
    batch = min(config.batch_size, windows)
    return {"statistics": 3 * 8 * (A + G), "boundary": 2 * 4 * carried * seq_len * hidden,
            "activations": 4 * batch * seq_len * (8 * hidden + 4 * inter + 2 * heads * seq_len),
            "head": 4 * 4 * min(HEAD_CHUNK, batch * seq_len * int(model.config.vocab_size))}


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def available_memory() -> int | None:
    """``MemAvailable`` of this machine in bytes (None where /proc/meminfo is missing)."""
    try:
        match = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def prune_streamed(
    spec: str | Path | None, config: Config, out: str | Path, *, calibration: TokenSource | None = None,
    calib_samples: int | None = None,
    seq_len: int = 512, seed: int = 0, calib_text: str | Path | None = None, data_dir: str | Path | None = None,
    extra: dict | None = None, progress: bool = False, force: bool = False, lazy: LazyModel | None = None,
    check: bool | None = None, bos_statistics: str = "include",
) -> dict:
    """Prune a model larger than memory: one decoder layer read, pruned and written at a time.

    ``check``: afterwards, load the written model whole and compare, on two calibration windows, every
    decoder layer's outputs along the layer-at-a-time path the statistics came from with the model's
    own forward pass (:func:`check_layerwise`); None: where the whole model fits in half the memory
    available. The result is the report's ``layerwise_check``; a difference is logged as a warning.

    The layer-wise methods (SparseGPT, Wanda, magnitude, with or without SDS) give the same tensors as
    :func:`prune` then :func:`save` (``tests/test_streaming.py``); so does LLM Surgeon, whose shots
    walk the layers forward and back with their files in ``.NAME.partial/surgeon``
    (:mod:`surgeon.streamed_surgeon`, ``tests/test_streamed_surgeon.py``; structured runs are written
    with the removed groups as zeros, not cut). The checkpoint is written shard by shard into a hidden
    sibling of ``out`` and renamed at the end; an interrupted run resumes from its last finished layer
    step (:mod:`export.streaming`). Returns the report as written. Under torchrun every rank streams
    and shares each layer's work; rank 0 alone writes (docs/distributed.md; streamed LLM Surgeon
    too, each rank with a spill directory of its own).
    """
    check_streamable(config)
    check_choice("--bos-statistics", bos_statistics, ("include", "exclude"))
    init_distributed()
    lazy = lazy or open_lazy(spec, head=needs_head(config))
    check_model(lazy.model, lazy.adapter, config)
    if calibration is None:
        calibration = _calibration(lazy.model, lazy.tokenizer, config, calib_samples, seq_len=seq_len, seed=seed,
                                   text=calib_text, data_dir=data_dir, held=False)
    check_ranks(lazy.path, config, calibration)
    _check_disk(lazy, config, calibration, Path(out))
    settings = {"config": config.to_dict(), "seed": seed, "seq_len": seq_len, "bos_statistics": bos_statistics,
                "calibration": calibration.origin if calibration else None,
                "windows": int(calibration.ids.shape[0]) if calibration else 0}
    stream = StreamedLayers(lazy, Path(out), settings, force=force, writer=dist.is_main())  # rank 0 writes
    with resumable(stream.partial, stream.out) if dist.is_main() else nullcontext():  # Ctrl-C names what stays
        report = _prune_recorded(lazy.model, lazy.adapter, calibration, config, bos_statistics, stream=stream,
                                 spill=stream.partial / "surgeon", progress=progress)
        written = stream.finish({"model": lazy.source, **(extra or {}), **report.to_dict()})
    if check is None:
        free = available_memory()
        check = not dist.active() and free is not None and 2 * lazy.weights.nbytes(torch.float32) < free
    if check and calibration is not None and dist.is_main():
        written["layerwise_check"] = check_layerwise(Path(out), calibration.ids[:2])
        write_file(Path(out) / REPORT_FILE, json.dumps(written, indent=2))
    return written


def _check_disk(lazy: LazyModel, config: Config, calibration: TokenSource | None, out: Path) -> None:
    """Refuse a streamed run, before any work, whose disk cannot hold its peak: the checkpoint (the source's
    shapes and dtype) and, for LLM Surgeon, the walk's files beside it (:func:`surgeon.streamed_surgeon.
    spill_bytes`); a run that resumes its own files only warns."""
    dtype = lazy.weights.dtype()
    need = lazy.weights.nbytes(dtype)
    what = "the streamed checkpoint"
    if isinstance(config, SurgeonConfig) and calibration is not None:
        need = spill_bytes(lazy.model, lazy.adapter, config, *calibration.ids.shape, dtype=dtype, checkpoint=need)
        what = "the streamed LLM Surgeon walk's files and the checkpoint"
    check_free_disk(out, need, what, resuming=partial_dir(out).exists())


LAYERWISE_TOLERANCE = 1e-5  # relative; the two paths run the same modules on the same inputs: 0.0 when right


def _leading_bos(calibration: TokenSource | None, bos_statistics: str) -> bool:
    """Whether the statistics leave out each window's first position: it is BOS and ``bos_statistics`` (checked
    by the callers before any work) says so."""
    return calibration is not None and calibration.bos is not None and bos_statistics == "exclude"


def check_layerwise(directory: Path, ids: torch.Tensor) -> dict:
    """The written model whole, against the layer-at-a-time path on ``ids`` (:func:`surgeon.calibrate.
    layerwise_differences`): ``{"windows", "max_relative_difference", "first_layer_over", "ok"}``."""
    lm = load_model(directory)
    differences = layerwise_differences(lm.model, lm.adapter, ids)
    worst = max(differences)
    over = next((i for i, d in enumerate(differences) if d > LAYERWISE_TOLERANCE), None)
    if over is not None:
        log.warning("layer-wise check: decoder layer %d's outputs differ from the model's own forward pass by "
                    "%.3g (relative); the statistics this run pruned with do not match the model: prune it with "
                    "--no-streaming, and report the architecture", over, differences[over])
    else:
        log.info("layer-wise check: every decoder layer's outputs match the model's own forward pass (max "
                 "relative difference %.3g on %d windows)", worst, ids.shape[0])
    return {"windows": int(ids.shape[0]), "max_relative_difference": worst, "first_layer_over": over,
            "ok": over is None}


def save(lm: LoadedModel, out: str | Path, report: PruneReport | None = None, *, align: int = 1,
         extra: dict | None = None, force: bool = False, layout: str = "default") -> dict:
    """Write the pruned model: structured runs physically smaller (cut by ``report.removal``), others masked.

    ``extra`` joins the written report (the CLI adds the model, calibration and perplexity); ``layout``
    ``"nemotron-nas"`` writes a structured run's smaller checkpoint in that layout (:class:`ShrinkConfig`).
    Returns the report as written (``saved_sparsity``, ``bytes_on_disk``, ``shrink`` for structured).
    In a data-parallel run only rank 0 writes; the other ranks write nothing and get ``{}``.
    """
    if not dist.is_main():
        return {}
    if layout != "default" and (report is None or report.removal is None or report.config.get("pattern")):
        raise SurgeonError(f"--layout {layout} lays out a structured run's smaller checkpoint; this one keeps its shapes")
    out = Path(out)
    full = {"model": lm.source, **(extra or {}), **(report.to_dict() if report else {})}
    if report is not None and report.removal is not None and report.config.get("pattern"):
        # Cutting a removed input column shifts the columns after it: down_proj's N:M blocks would no
        # longer line up. The removed groups stay as zeros, every N:M block intact.
        log.warning("structured removal with an N:M pattern: the removed groups are saved as zeros, not cut "
                    "(cutting columns would break the %s blocks)", report.config["pattern"])
    elif report is not None and report.removal is not None:  # zeroed groups become smaller matrices
        return shrink_and_save(lm.model, lm.tokenizer, lm.adapter, out, ShrinkConfig(align=align, layout=layout),  # type: ignore[arg-type]
                               plan=RemovalPlan.from_dict(report.removal), report=full, force=force,
                               source_dir=lm.path)
    return save_checkpoint(lm.model, lm.tokenizer, out, full, list(lm.adapter.decoder_linears(lm.model)), force=force,
                           source_dir=lm.path)


def check_align(lm: LoadedModel, align: int) -> None:
    """Refuse an ``--align`` the model's layers cannot take before any pruning (the shrink would refuse it
    only after): every layer needs at least ``align`` MLP channels and enough KV heads for aligned widths."""
    from base.surgery import layer_shapes
    from export.shapes import head_unit

    if align < 1:
        raise SurgeonError(f"--align must be at least 1, got {align}")
    if align == 1:
        return
    unit = head_unit(align, lm.adapter.head_dim(lm.model.config))
    for i, shape in enumerate(layer_shapes(lm.model, lm.adapter)):
        if shape.intermediate_size < align:
            raise SurgeonError(f"--align {align}: layer {i} has only {shape.intermediate_size} MLP channels")
        if shape.num_key_value_heads < unit:
            raise SurgeonError(f"--align {align}: layer {i} has {shape.num_key_value_heads} KV heads; aligned "
                               f"attention widths need multiples of {unit} KV heads")


def shrink(lm: LoadedModel, out: str | Path, config: ShrinkConfig | None = None, *, force: bool = False) -> dict:
    """Cut the fully zeroed MLP channels and heads out of a masked model and save it smaller."""
    return shrink_and_save(lm.model, lm.tokenizer, lm.adapter, Path(out), config or ShrinkConfig(),
                           report={"model": lm.source, "plan": "zero groups"}, force=force, source_dir=lm.path)


def export_onnx(lm: LoadedModel, out: str | Path, config: OnnxConfig | None = None, *, force: bool = False) -> dict:
    """ONNX decoder graph with KV cache, checked against torch (:func:`export.onnx.export_onnx`); the manifest."""
    return _export_onnx(lm.model, lm.tokenizer, Path(out), config or OnnxConfig(), source=lm.source,
                        source_dir=lm.path, force=force)


def export_gguf(model: str | Path | None, out: str | Path, *, tensor_type: str = "f16", uniform: bool = False,
                force: bool = False, ffn_align: int = FFN_ALIGN) -> dict:
    """One ``.gguf`` file for llama.cpp (:func:`export.gguf.export_gguf`) from a model directory, a ``.gguf``
    file or the default model (None); per-layer shapes as llama.cpp's ``deci`` architecture (docs/gguf.md)."""
    check_gguf_target(Path(out), force)
    directory, source = resolve_model_dir(model)
    return _export_gguf(directory, Path(out), tensor_type=tensor_type, uniform=uniform, force=force,
                        source=source, ffn_align=ffn_align) | {"source": source}


def pack(lm: LoadedModel, out: str | Path, config: PackConfig | None = None, *, force: bool = False) -> dict:
    """Compressed safetensors (N:M, CSR or BSR) of a pruned model, pattern checked; the manifest."""
    return pack_checkpoint(lm, Path(out), config or PackConfig(), force=force)


def bench_config(models: list[str], backends: list[str], *, device: str = "auto", prefill: str = "1x128,8x512",
                 decode: str = "1,8", **options: Any) -> BenchConfig:
    """The ``bench`` command's config from its text options: models as ``[LABEL=]PATH``, backends (one for all
    or one per model), prefill cells ``BxL,...``, decode batch sizes ``B,...``; ``options`` as
    :class:`BenchConfig` takes them (threads: torch's current number)."""
    check_choice("--isolation", options.get("isolation", "process"), ("process", "inline"))
    return BenchConfig(models=parse_models(models, backends), device=resolve_device(device),
                       threads=torch.get_num_threads(), prefill=parse_prefill(prefill), decode=parse_batches(decode),
                       **options)


def bench(config: BenchConfig, out: str | Path, baseline: str | Path | None = None,
          max_regression: float = 0.05, *, force: bool = False) -> dict:
    """Benchmark the models of ``config`` (the first is the baseline); writes JSON, markdown and plots
    (an existing result JSON is replaced only with ``force``)."""
    return _bench(config, Path(out), Path(baseline) if baseline else None, max_regression, force=force)


@dataclass
class PruneJob:
    """A `prune` run around its pruning config: the model, the calibration, where and whether to stream, what
    follows (recovery, evaluation, the saved checkpoint). The ``surgeon-export prune`` options, as they are."""

    model: str | Path | None = None  # a model directory, a .gguf file, None: the default model
    out: Path | None = None  # where the pruned checkpoint goes (None: not saved)
    calib_samples: int | None = None  # default: the config's (surgeon.api.calibration_size)
    seq_len: int = 512
    seed: int = 0
    calib_text: Path | None = None
    data_dir: Path | None = None
    bos_statistics: str = "include"
    checkpoint: Path | None = None  # whole-model LLM Surgeon: state after every shot, to resume
    streaming: bool | None = None  # None: when the whole model would not fit (memory_plan)
    max_memory: int | None = None  # bytes; the budget streaming is chosen against
    check_streaming: bool | None = None  # prune_streamed's ``check``
    align: int = 1  # structured: kept sizes rounded up to multiples of this in the saved checkpoint
    recover: RecoverConfig | None = None  # distil the pruned model from the dense one before saving
    recover_data: str = "calibration"
    recover_windows: int = 256
    evaluate: bool = True  # protocol perplexity of the pruned model
    force: bool = False
    progress: bool = False
    dist_timeout: float | None = None  # under torchrun: seconds a collective waits


def prune_job(config: Config, job: PruneJob) -> dict:
    """The ``prune`` command: check everything, choose streaming (every rank as rank 0 chose), prune,
    recover, evaluate and save; returns the report as printed (``{}`` on ranks other than 0, which
    write and print nothing). :func:`run` calls it for its pruning step."""
    init_distributed(job.dist_timeout)
    check_choice("--bos-statistics", job.bos_statistics, ("include", "exclude"))
    if job.align != 1 and (getattr(config, "structured", None) is None or job.out is None):
        raise SurgeonError("--align rounds the sizes of a --structured run's smaller checkpoint: give --structured and --out")
    if job.recover is not None:
        check_choice("--recover-data", job.recover_data, RECOVER_DATA)
        if job.streaming:
            raise SurgeonError("--recover trains the whole model; it does not run with --streaming")
        if dist.active():
            raise SurgeonError("--recover does not run data-parallel yet (it trains the whole model); run it in one "
                               "process on the pruned checkpoint")
    if job.out is not None and dist.is_main():  # rank 0 alone writes
        prepare_target(job.out, job.force, source=job.model)
    if job.checkpoint is not None and dist.is_main():
        check_writable(job.checkpoint / "progress.json", "--checkpoint")
    plan = _streaming_plan(config, job)
    if plan is not None and plan.streaming:
        payload = _prune_streamed_job(config, job, plan)
    else:
        del plan  # and its lazy model: the whole model loads now
        payload = _prune_whole_job(config, job)
    if not payload:
        return {}
    for key in ("layers", "removal"):
        payload.pop(key, None)
    if "refine" in payload:
        payload["refine"].pop("linears", None)
    from base.env import environment, peak_rss_mib

    return {**payload, "peak_rss_mib": peak_rss_mib(), "environment": environment()}


def _streaming_plan(config: Config, job: PruneJob) -> MemoryPlan | None:
    """Whether ``job`` streams (None: it cannot, e.g. recovery trains the whole model); under torchrun every
    rank takes rank 0's choice (free memory may differ between nodes)."""
    lazy = open_lazy(job.model, head=needs_head(config)) if job.streaming is not False and job.recover is None else None
    n = job.calib_samples or calibration_size(config)
    plan = memory_plan(lazy, config, n, job.seq_len, streaming=job.streaming,
                       max_memory=job.max_memory) if lazy is not None else None
    if dist.active():
        chosen = dist.broadcast_json(0, bool(plan is not None and plan.streaming))
        if plan is None or plan.streaming != chosen:
            lazy = lazy or open_lazy(job.model, head=needs_head(config))
            plan = memory_plan(lazy, config, n, job.seq_len, streaming=chosen, max_memory=job.max_memory)
    if plan is not None:
        plan.lazy = lazy
    return plan


def _prune_streamed_job(config: Config, job: PruneJob, plan: MemoryPlan) -> dict:
    if job.out is None:
        raise SurgeonError("streamed pruning writes each layer as it is done: give --out DIR")
    log.info("streaming, one decoder layer at a time (%s; streamed: about %.1f GiB)", plan.reason, plan.streamed / 2**30)
    if job.align != 1:
        raise SurgeonError("--align sizes the smaller checkpoint a whole-model run cuts; a streamed run writes the "
                           "removed groups as zeros: give --align to `surgeon-export shrink` on its output")
    if job.checkpoint is not None:
        log.info("streamed runs resume from their partial directory beside --out; --checkpoint is not used")
    written = prune_streamed(job.model, config, job.out, calib_samples=job.calib_samples, seq_len=job.seq_len,
                             seed=job.seed, calib_text=job.calib_text, data_dir=job.data_dir, progress=job.progress,
                             force=job.force, lazy=plan.lazy, check=job.check_streaming,
                             bos_statistics=job.bos_statistics)
    if not dist.is_main():
        return {}
    payload = {**written, "memory_plan": {"whole_bytes": plan.whole, "streamed_bytes": plan.streamed,
                                          "available_bytes": plan.available, "reason": plan.reason}}
    if job.evaluate:
        payload["perplexity"] = evaluate(load(job.out), data_dir=job.data_dir, seq_len=job.seq_len,
                                         progress=job.progress)[0].to_dict()
    return {**payload, "out": str(job.out)}


def _prune_whole_job(config: Config, job: PruneJob) -> dict:
    lm = load(job.model)
    check_align(lm, job.align)  # before the pruning, not after it
    teacher = train = None
    if job.recover is not None:  # the dense model as the teacher, and the training windows, before pruning changes lm
        train = recovery_windows(lm, job.recover_windows, seq_len=job.recover.seq_len or job.seq_len,
                                 data=job.recover_data, seed=job.seed + 1, calib_text=job.calib_text,
                                 data_dir=job.data_dir)
        teacher = load(job.model)
    report = prune(lm, config, calib_samples=job.calib_samples, seq_len=job.seq_len, seed=job.seed,
                   calib_text=job.calib_text, data_dir=job.data_dir, checkpoint=job.checkpoint,
                   progress=job.progress, bos_statistics=job.bos_statistics)
    if not dist.is_main():
        return {}
    extra: dict[str, Any] = {}
    if job.recover is not None and teacher is not None and train is not None:
        log.info("recovering: %d distillation steps from the dense model (%s)", job.recover.steps, train.origin)
        recovered = recover(lm, teacher, job.recover, windows=train, progress=job.progress,
                            checkpoint=job.checkpoint / "recover" if job.checkpoint else None)
        del teacher
        extra["recover"] = {k: v for k, v in recovered.to_dict().items() if k != "losses"}
    if job.evaluate:
        extra["perplexity"] = evaluate(lm, data_dir=job.data_dir, seq_len=job.seq_len,
                                       progress=job.progress)[0].to_dict()
    payload = {"model": lm.source, **report.to_dict(), **extra}
    if job.out is not None:
        written = save(lm, job.out, report, align=job.align, extra=extra, force=job.force)
        if "shrink" in written:  # cut physically (structured without an N:M pattern)
            payload["remaining_fraction"] = written["shrink"]["remaining_fraction"]
        payload.update(out=str(job.out), saved_sparsity=written.get("saved_sparsity"),
                       bytes_on_disk=written.get("bytes_on_disk"))
    return payload


@dataclass
class RunConfig:
    """The main job: structured pruning, the smaller checkpoint, ONNX, dense-vs-pruned benchmark."""

    model: str | None = None
    out: Path = Path("surgeon-out")
    structured: float = 0.8
    method: str = "surgeon"  # surgeon or wanda
    allocation: str = "uniform"
    shots: int = 2  # the main job: as good as 3 at 80% on the default model, 2/3 of the time (main_job_shots.json)
    calib_samples: int = 16
    # kept sizes rounded up to multiples of 8 (zero channels brought back: the same function): an MLP 1126 wide ran
    # 21% slower than one 1128 wide on this CPU's GEMMs (session 20, docs/llm_surgeon.md)
    align: int = 8
    ppl_windows: int = 64
    seq_len: int = 512
    text: Path | None = None
    data_dir: Path | None = None
    onnx: bool = True
    runtimes: bool = True  # also benchmark dense and pruned on llama.cpp, when installed
    openvino: bool = False  # also on OpenVINO (the ONNX exports), when installed: asked for, not by default
    recover: RecoverConfig | None = None  # distil the pruned model from the dense one before saving it
    recover_windows: int = 256
    recover_data: str = "calibration"
    threads: int | None = None
    progress: bool = True
    force: bool = False


LLAMA_CPP_CHECK_WINDOWS = 4  # the main job's llama.cpp row: its perplexity checked on these windows, then shared


def installed_runtimes() -> list[str]:
    """The optional runtime backends whose packages are installed (``openvino``, ``llama.cpp``)."""
    import importlib.util

    return [name for name, module in (("openvino", "openvino"), ("llama.cpp", "llama_cpp"))
            if importlib.util.find_spec(module) is not None]


def run(cfg: RunConfig) -> dict:
    """The main job; returns ``{"prune", "remaining_fraction", "benchmark"}`` and writes under ``cfg.out``."""
    prepare_target(cfg.out, cfg.force, source=cfg.model)
    check_choice("--method", cfg.method, ("surgeon", "wanda"))
    config = build_config(cfg.method, structured=cfg.structured, shots=cfg.shots, allocation=cfg.allocation)
    runtimes = installed_runtimes() if cfg.runtimes else []
    steps = 2 + cfg.onnx + ("llama.cpp" in runtimes)
    pruned_dir = cfg.out / "pruned"
    log.info("1/%d structured pruning (%s): keep %.0f%% of decoder-linear weights, %d shot(s), %d x %d calibration "
             "tokens; the smaller model goes to %s", steps, cfg.method, 100 * cfg.structured, config.shots,
             cfg.calib_samples, cfg.seq_len, pruned_dir)
    stages: dict[str, float] = {}  # where the job's time goes (seconds per stage)
    parity: dict[str, float] = {}

    @contextmanager
    def stage(name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        stages[name] = round(time.perf_counter() - start, 1)

    with stage("prune and save"):
        pruned = prune_job(config, PruneJob(
            model=cfg.model, out=pruned_dir, calib_samples=cfg.calib_samples, seq_len=cfg.seq_len, calib_text=cfg.text,
            data_dir=cfg.data_dir, streaming=False, align=cfg.align, recover=cfg.recover,
            recover_data=cfg.recover_data, recover_windows=cfg.recover_windows, evaluate=False, force=True, progress=cfg.progress))
    # Like with like: on every runtime the dense model runs beside the pruned one (dense first: the
    # runtime's baseline, benchmarks/run.py). Perplexity is measured on torch; the ONNX rows share torch's (the
    # same weights, checked against torch by the export), and so does llama.cpp's pruned row (its own kernels and
    # file) once its perplexity on the first windows agrees with torch's (else it is measured in full).
    # The dense model's perplexity is the same work in every run: kept in our cache, keyed by everything that
    # could change it (benchmarks/worker.py: cached_perplexity), and measured again when anything differs.
    models = [ModelSpec(label="dense", spec=cfg.model, cache_perplexity=True),
              ModelSpec(label="pruned", spec=str(pruned_dir))]
    if cfg.onnx:
        log.info("2/%d exporting the dense and the pruned model to ONNX (%s)", steps, cfg.out)
        for name, source in (("dense", cfg.model), ("pruned", pruned_dir)):
            with stage(f"onnx export {name}"):
                manifest = export_onnx(load(source), cfg.out / f"{name}-onnx", force=True)
            parity[f"{name}-onnx"] = manifest["verification"]["max_abs_diff"]
            log.info("%s exported in %.0f s; ONNX Runtime vs torch: largest logit difference %.1e",
                     name, manifest["export_seconds"], parity[f"{name}-onnx"])
        for runtime in ("onnxruntime", *(["openvino"] if cfg.openvino and "openvino" in runtimes else [])):
            suffix = "onnx" if runtime == "onnxruntime" else runtime  # OpenVINO: the same exports
            models += [ModelSpec(label=f"dense-{suffix}", spec=str(cfg.out / "dense-onnx"), backend=runtime,
                                 perplexity="dense"),
                       ModelSpec(label=f"pruned-{suffix}", spec=str(cfg.out / "pruned-onnx"), backend=runtime,
                                 perplexity="pruned")]
    skipped = {}
    if "llama.cpp" in runtimes:
        log.info("%d/%d writing the pruned model as GGUF for llama.cpp (%s; the dense one: once, in the model cache)",
                 steps - 1, steps, cfg.out / "pruned-gguf")
        try:
            with stage("gguf export pruned"):
                pruned_gguf = _gguf_with_companion(pruned_dir, cfg.out / "pruned-gguf")
            with stage("gguf export dense (cached after the first run)"):
                dense_gguf = _cached_gguf(cfg.model)
            models += [ModelSpec(label="dense-llama.cpp", spec=str(dense_gguf), backend="llama.cpp", perplexity=False),
                       ModelSpec(label="pruned-llama.cpp", spec=str(pruned_gguf), backend="llama.cpp",
                                 perplexity="pruned", check_windows=LLAMA_CPP_CHECK_WINDOWS)]
        except SurgeonError as exc:  # a family or tokenizer GGUF cannot express: the rest of the job stands
            skipped["llama.cpp"] = str(exc)
            log.warning("llama.cpp skipped: %s", exc)
    log.info("%d/%d benchmarking dense vs pruned (%s)", steps, steps,
             ", ".join(dict.fromkeys(m.backend for m in models)))
    bench_cfg = BenchConfig(
        models=models, threads=cfg.threads or torch.get_num_threads(), prefill=[(1, 128)], decode=[1],
        prompt_len=64, new_tokens=32, repeat=5,
        ppl=PplConfig(windows=cfg.ppl_windows, seq_len=cfg.seq_len, text=str(cfg.text) if cfg.text else None,
                      data_dir=str(cfg.data_dir) if cfg.data_dir else None),
        progress=cfg.progress,
    )
    with stage("benchmark"):
        result = bench(bench_cfg, cfg.out / "benchmark.json", force=True)  # the run owns cfg.out (checked above)
    add_measurements(pruned_dir, benchmark_lines(result, "pruned"))  # the card gets the speed measured here
    out = {"prune": pruned, "remaining_fraction": pruned["remaining_fraction"], "benchmark": result,
           "onnx_parity_max_abs_logit_diff": parity, "runtimes_skipped": skipped, "stage_seconds": stages}
    if "recover" in pruned:
        out["recover"] = pruned["recover"]
    return out


def _gguf_with_companion(model_dir: Path, out: Path) -> Path:
    """``model_dir`` as ``out/model-f32.gguf`` beside a copy of its config and tokenizer files, the Hugging
    Face directory the llama.cpp backend takes them from (:func:`runtime.llama_cpp.companion_directory`)."""
    import shutil

    prepare_target(out, True, source=model_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copy2(f, out / f.name)
    target = out / "model-f32.gguf"
    export_gguf(model_dir, target, tensor_type="f32", force=True)
    return target


def _cached_gguf(spec: str | Path | None) -> Path:
    """The F32 GGUF of a model directory in the model cache, written on first use
    (:func:`runtime.llama_cpp.gguf_for_directory`: keyed by the files' checksums)."""
    from runtime.llama_cpp import gguf_for_directory

    return gguf_for_directory(resolve_model_dir(spec)[0], "F32")


def generate_text(
    backend: str, model: str | Path | None, prompts: list[str], cfg: GenerationConfig | None = None, *,
    stop: tuple[int, ...] | None = None, device: str = "cpu", threads: int | None = None, chat: bool = False,
) -> tuple[Generation, list[str], GenerationConfig]:
    """Generate from text prompts on a runtime backend: the generation, the decoded texts, the config used.

    ``stop`` defaults to the model's EOS ids (``generation_config.json``, else the tokenizer's); the
    padding id to the tokenizer's, else the first stop id.
    """
    decoder = load_backend(backend, model, device=device, threads=threads)
    tokenizer = decoder.tokenizer
    ids = encode_prompts(tokenizer, prompts, chat=chat)
    stops = tuple(stop) if stop else eos_ids(decoder.directory, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    cfg = replace(cfg or GenerationConfig(), stop_tokens=stops, pad_token_id=pad)
    out = generate(decoder, ids, cfg)
    return out, [tokenizer.decode(t, skip_special_tokens=True) for t in out.tokens], cfg


def generate_report(backend: str, model: str | Path | None, prompts: list[str], cfg: GenerationConfig | None = None,
                    **options: Any) -> dict:
    """The ``generate`` command: :func:`generate_text` as a report (each prompt's tokens, whether it stopped,
    its text; prefill seconds and decode tokens/s)."""
    from dataclasses import asdict

    out, decoded, cfg = generate_text(backend, model, prompts, cfg, **options)
    rows = [{"prompt": t, "tokens": toks, "stopped": s, "text": d}
            for t, toks, s, d in zip(prompts, out.tokens, out.stopped, decoded)]
    speed = len(prompts) * out.steps / out.decode_seconds if out.steps else None
    return {"model": model, "backend": backend, "config": asdict(cfg), "outputs": rows,
            "prefill_seconds": out.prefill_seconds, "decode_tokens_per_s": speed}


def parse_blocksize(text: str) -> tuple[int, int]:
    """``pack --blocksize ROWSxCOLS`` as two positive sizes."""
    try:
        block = tuple(int(b) for b in text.lower().split("x"))
    except ValueError:
        raise SurgeonError(f"--blocksize must be ROWSxCOLS, e.g. 4x4, got {text!r}") from None
    if len(block) != 2 or min(block) < 1:
        raise SurgeonError(f"--blocksize must be ROWSxCOLS with positive sizes, got {text!r}")
    return block  # type: ignore[return-value]


def setup_vllm(target: Path | None = None, quiet: bool = False) -> Path:
    """Create vLLM's own environment (``surgeon-export vllm-setup``; :func:`runtime.vllm_env.setup_env`)."""
    from runtime.vllm_env import setup_env

    return setup_env(target, quiet=quiet)


def rerun_in(python: str) -> None:
    """Replace this process by the same command line run by ``python`` (vLLM's environment)."""
    from runtime.vllm_env import rerun

    rerun(python, "surgeon_export")


__all__ += ["backend_python", "rerun_in", "setup_vllm"]

__all__ += ["PruneJob", "bench_config", "check_choice", "evaluate_model", "gate_table", "generate_report", "info",
            "interrupted_message", "launched_ranks", "markdown", "parse_blocksize", "parse_tolerance", "prepare_target",
            "prune_job", "set_threads", "shutdown_distributed"]
__all__ += ["MemoryPlan", "check_align", "init_distributed", "Perplexity", "RemovalPlan", "count_parameters", "generate_text", "memory_plan",
            "needs_head", "open_lazy", "parse_bytes", "prune_streamed"]
