"""The benchmark runner: several models, one run, ratios to the first (BENCHMARK_PROTOCOL.md).

Every model gets its perplexity, artefact facts (bytes on disk, parameters, zeros counted in the
loaded tensors) and, per cell of the grid, the median and spread of at least five timed
repetitions after warm-up, with peak memory. Repetitions interleave between models (repetition
``r`` starts at model ``r mod M``), so slow drifts of a shared machine hit every model alike; the
first model is the baseline and every other model's numbers are also given as ratios to it.

Like with like: the first model on each backend is that runtime's baseline, and every later model
on the same backend is also given as ratios to it (``ratios_same_runtime``), so "pruned on ONNX
Runtime against dense on ONNX Runtime" reads apart from "ONNX Runtime against torch". A runtime
baseline measured without perplexity (``ModelSpec.perplexity`` false: the same weights as a row
already evaluated, parity-checked by the export) takes the perplexity of the first model, and the
ratio names it (``perplexity_against``). The result is the JSON document described in
``docs/benchmarks.md`` (``SCHEMA_VERSION``).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from base.env import environment
from base.errors import SurgeonError
from base.files import check_writable
from benchmarks import latency
from benchmarks.gate import SCHEMA_VERSION, check_comparable, compare, load_baseline
from benchmarks.report import write_outputs
from benchmarks.worker import InlineClient, OutOfMemory, ProcessClient
from runtime.backend import backend_python, check_backend, check_device, resolve_dtype

log = logging.getLogger(__name__)

MIN_REPEAT = 5  # the protocol's minimum number of timed repetitions
SHARE_TOLERANCE = 1e-3  # relative perplexity difference on the check windows under which a share stands
Isolation = Literal["process", "inline"]


@dataclass(frozen=True)
class ModelSpec:
    """One model of a run: its label in reports, what to load, and with which backend."""

    label: str
    spec: str | None  # a path, or None for the default model
    backend: str = "torch"
    # True: evaluated; False: not evaluated; a label: the perplexity of that (evaluated) row, shared because this
    # row runs the same weights on another runtime, checked against it by its export (ONNX's verification)
    perplexity: bool | str = True
    # with a label: first measure this row's perplexity on its first N windows and the label's on the same ones;
    # shared when they agree within SHARE_TOLERANCE, else this row is evaluated in full (llama.cpp's own kernels)
    check_windows: int = 0
    # evaluated rows: take the perplexity from our cache when the same files were measured the same way before
    # (benchmarks/worker.py: cached_perplexity), else measure and keep it (the main job's dense model)
    cache_perplexity: bool = False


@dataclass
class PplConfig:
    """Protocol perplexity settings (WikiText-2 test unless ``text``)."""

    windows: int | None = 64  # None: every window (--full)
    seq_len: int = 512
    batch_size: int = 4
    text: str | None = None
    data_dir: str | None = None


@dataclass
class BenchConfig:
    """Everything one benchmark run measures."""

    models: list[ModelSpec]
    device: str = "cpu"
    dtype: str = "auto"  # float32 on CPU, float16 on CUDA (runtime.backend.resolve_dtype)
    threads: int | None = None
    prefill: list[tuple[int, int]] = field(default_factory=lambda: [(1, 128), (8, 512)])  # (batch, length)
    decode: list[int] = field(default_factory=lambda: [1, 8])  # batch sizes
    prompt_len: int = 128  # decode prompt length
    new_tokens: int = 128
    repeat: int = 5
    warmup: int = 1
    seed: int = 0
    ppl: PplConfig | None = field(default_factory=PplConfig)
    isolation: Isolation = "process"
    progress: bool = True

    def validate(self) -> None:
        """Refuse impossible settings before anything is loaded."""
        if not self.models:
            raise SurgeonError("give at least one model to benchmark")
        if self.repeat < MIN_REPEAT:
            raise SurgeonError(f"--repeat must be at least {MIN_REPEAT} (the protocol's minimum), got {self.repeat}")
        if self.warmup < 1:
            raise SurgeonError(f"--warmup must be at least 1, got {self.warmup}")
        if self.new_tokens < 1 or self.prompt_len < 1:
            raise SurgeonError("--new-tokens and --prompt-len must be at least 1")
        if self.ppl is not None and (self.ppl.windows is not None and self.ppl.windows < 1):
            raise SurgeonError(f"--ppl-windows must be at least 1, got {self.ppl.windows}")
        labels = {m.label: m for m in self.models}
        for m in self.models:
            check_backend(m.backend)
            if isinstance(m.perplexity, str) and (m.perplexity not in labels or labels[m.perplexity].perplexity is not True):
                raise SurgeonError(f"model {m.label} shares the perplexity of {m.perplexity!r}, which is not an "
                                   "evaluated model of this run")
            if m.check_windows < 0 or (m.check_windows and not isinstance(m.perplexity, str)):
                raise SurgeonError(f"model {m.label}: check_windows checks a shared perplexity (a label), "
                                   f"got {m.check_windows} with perplexity={m.perplexity!r}")
            if m.cache_perplexity and m.perplexity is not True:
                raise SurgeonError(f"model {m.label}: cache_perplexity keeps an evaluated row's perplexity, "
                                   f"got perplexity={m.perplexity!r}")
        missing = [m.spec for m in self.models if m.spec is not None and not Path(m.spec).expanduser().exists()]
        if missing:  # every path before any model loads (loading the others first takes minutes)
            raise SurgeonError(f"model path not found: {', '.join(missing)}")
        resolve_dtype(self.dtype, self.device)


def resolve_device(name: str) -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``; other names pass through."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    check_device(name)
    return name


def parse_prefill(text: str) -> list[tuple[int, int]]:
    """``"1x128,8x512"`` -> ``[(1, 128), (8, 512)]``; ``""`` or ``"none"`` -> ``[]``."""
    if text.strip().lower() in ("", "none"):
        return []
    cells = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*[x×]\s*(\d+)\s*", item)
        if match is None or min(int(match[1]), int(match[2])) < 1:
            raise SurgeonError(f"bad prefill cell {item.strip()!r}: expected BATCHxLENGTH, e.g. 8x512")
        cells.append((int(match[1]), int(match[2])))
    return cells


def parse_batches(text: str) -> list[int]:
    """``"1,8"`` -> ``[1, 8]``; ``""`` or ``"none"`` -> ``[]``."""
    if text.strip().lower() in ("", "none"):
        return []
    try:
        batches = [int(b) for b in text.split(",")]
    except ValueError:
        raise SurgeonError(f"bad decode batch sizes {text!r}: expected e.g. 1,8") from None
    if min(batches) < 1:
        raise SurgeonError(f"decode batch sizes must be at least 1, got {text!r}")
    return batches


def parse_models(models: list[str], backends: list[str]) -> list[ModelSpec]:
    """``[LABEL=]PATH`` (or ``default``) per model; one backend for all, or one per model."""
    if len(backends) not in (1, len(models)):
        raise SurgeonError(f"give one --backend for all models or one per model ({len(models)}), not {len(backends)}")
    specs, seen = [], set()
    for i, item in enumerate(models):
        label, _, path = item.rpartition("=") if "=" in item else ("", "", item)
        spec = None if path in ("", "default") else path
        label = label or ("default" if spec is None else path.rstrip("/").rsplit("/", 1)[-1])
        unique, n = label, 2
        while unique in seen:
            unique, n = f"{label}#{n}", n + 1
        seen.add(unique)
        specs.append(ModelSpec(unique, spec, backends[0] if len(backends) == 1 else backends[i]))
    return specs


def _measure(clients: list, op: str, args: dict, cfg: BenchConfig) -> list[dict]:
    """Warm up, then ``cfg.repeat`` interleaved repetitions of one cell on every model that can run it."""
    n = len(clients)
    reasons: list[str | None] = [c.call({"op": "check", "batch": args["batch"],
                                         "length": args["length"] + args.get("new_tokens", 0)})
                                 for c in clients]
    samples: list[list[float]] = [[] for _ in range(n)]
    peaks = [0] * n
    request = {"op": op, "seed": cfg.seed, **args}
    for rep in range(-cfg.warmup, cfg.repeat):
        for i in [(rep + k) % n for k in range(n)]:  # rotate who goes first
            if reasons[i] is not None:
                continue
            try:
                reply = clients[i].call(request)
            except OutOfMemory as exc:
                reasons[i] = f"out of memory: {exc}"
                continue
            if rep >= 0:
                samples[i].append(reply["seconds"])
                peaks[i] = max(peaks[i], reply["peak_bytes"])
    tokens = args["batch"] * (args["new_tokens"] if op == "decode" else args["length"])
    cells: list[dict] = []
    for i in range(n):
        if reasons[i] is not None:
            log.warning("%s %s skipped for %s: %s", op, _cell_key(op, args), cfg.models[i].label, reasons[i])
            cells.append({"status": "skipped", "reason": reasons[i], "seconds": None,
                          "tokens_per_s": None, "peak_memory_bytes": None})
            continue
        cells.append({"status": "ok", "reason": None,
                      "seconds": latency.summarize(samples[i]).to_dict(),
                      "tokens_per_s": latency.summarize([tokens / s for s in samples[i]]).to_dict(),
                      "peak_memory_bytes": peaks[i]})
    return cells


def _cell_key(op: str, args: dict) -> str:
    return f"{args['batch']}x{args['length']}" if op == "prefill" else f"b{args['batch']}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _flops_ratio(a: dict, b: dict, length: int) -> float | None:
    """Matmul FLOPs per token, model / baseline, at the table length nearest ``length``."""
    fa, fb = a.get("flops_per_token"), b.get("flops_per_token")
    if not fa or not fb:
        return None
    key = min(fa, key=lambda n: abs(int(n) - length))
    return _ratio(fa[key], fb.get(key))


def ratios(model: dict, base: dict) -> dict:
    """Ratios of ``model`` to the baseline entry ``base``: quality, size and every shared grid cell.

    ``latency`` is median seconds / baseline median seconds (below 1 is faster); ``throughput`` is
    median tokens/s / baseline median tokens/s (above 1 is faster); ``latency_spread`` is the
    min and max of the per-repetition ratios (repetitions are paired: they ran interleaved).
    """
    a, b = model["artefact"], base["artefact"]
    ppl = _ratio(*(m["perplexity"]["perplexity"] if m["perplexity"] else None for m in (model, base)))
    nonzero = [x["parameters"]["decoder_linear"] - x["parameters"]["decoder_linear_zeros"] for x in (a, b)]
    out: dict = {"perplexity": ppl, "bytes_on_disk": _ratio(a["bytes_on_disk"], b["bytes_on_disk"]),
                 "parameters": _ratio(a["parameters"]["total"], b["parameters"]["total"]),
                 "remaining_decoder_linear": _ratio(*nonzero)}
    for kind in ("prefill", "decode"):
        out[kind] = {}
        for mine, ref in zip(model[kind], base[kind]):
            if mine["status"] != "ok" or ref["status"] != "ok":
                out[kind][mine["cell"]] = None
                continue
            paired = [x / y for x, y in zip(mine["seconds"]["samples"], ref["seconds"]["samples"])]
            out[kind][mine["cell"]] = {
                "flops": _flops_ratio(a, b, mine["length"]),
                "latency": mine["seconds"]["median"] / ref["seconds"]["median"],
                "throughput": mine["tokens_per_s"]["median"] / ref["tokens_per_s"]["median"],
                "latency_spread": [min(paired), max(paired)],
            }
    return out


def same_runtime_ratios(model: dict, ref: dict, base: dict) -> dict:
    """:func:`ratios` of ``model`` to ``ref``, the first model on its runtime; ``perplexity_against`` names
    the model whose perplexity the ratio uses (``base``'s when ``ref`` was not evaluated)."""
    against = ref if ref["perplexity"] is not None or base["perplexity"] is None else base
    out = ratios(model, {**ref, "perplexity": against["perplexity"]})
    return {**out, "perplexity_against": against["label"]}


def run_benchmark(cfg: BenchConfig) -> dict:
    """Measure every model of ``cfg``; returns the result document (schema ``SCHEMA_VERSION``).

    Args:
        cfg: models (the first is the baseline), grid, repetitions and perplexity settings.

    Example:
        >>> cfg = BenchConfig([ModelSpec("dense", "out/dense"), ModelSpec("pruned", "out/p50")])  # doctest: +SKIP
        >>> run_benchmark(cfg)["models"][1]["ratios"]["prefill"]["1x128"]["latency"]  # doctest: +SKIP
        0.93
    """
    cfg.validate()
    clients: list = []
    try:
        for m in cfg.models:
            clients.append(InlineClient(m.label) if cfg.isolation == "inline"
                           else ProcessClient(m.label, quiet=not cfg.progress, python=backend_python(m.backend)))
        entries = []
        for m, c in zip(cfg.models, clients):
            log.info("loading %s (%s)", m.label, m.backend)
            start = time.perf_counter()
            loaded = c.call({"op": "load", "backend": m.backend, "spec": m.spec,
                             "device": cfg.device, "dtype": cfg.dtype, "threads": cfg.threads})
            entries.append({"label": m.label, "spec": m.spec, "backend": m.backend, **loaded,
                            "wall_seconds": {"load": round(time.perf_counter() - start, 2)}})
            if cfg.isolation == "inline":
                entries[-1]["memory_method"] += "; inline: the process holds every model of the run"
        for m, c, e in zip(cfg.models, clients, entries):
            e["perplexity"] = None
            if cfg.ppl is not None and m.perplexity is True:
                log.info("perplexity of %s", m.label)
                start = time.perf_counter()
                e["perplexity"] = c.call({"op": "perplexity", **asdict(cfg.ppl), "progress": cfg.progress,
                                          "cache": m.cache_perplexity})
                e["wall_seconds"]["perplexity"] = round(time.perf_counter() - start, 2)
        by_label = {e["label"]: e for e in entries}
        clients_by_label = {m.label: c for m, c in zip(cfg.models, clients)}
        for m, c, e in zip(cfg.models, clients, entries):
            shared = by_label[m.perplexity]["perplexity"] if isinstance(m.perplexity, str) else None
            if shared is not None and m.check_windows:
                assert cfg.ppl is not None and isinstance(m.perplexity, str)
                start = time.perf_counter()
                e["perplexity"] = _checked_share(m, c, clients_by_label[m.perplexity], shared, cfg.ppl)
                e["wall_seconds"]["perplexity"] = round(time.perf_counter() - start, 2)
            elif shared is not None:
                e["perplexity"] = {**shared, "shared_from": m.perplexity}
        grid = [("prefill", {"batch": b, "length": t}) for b, t in cfg.prefill]
        grid += [("decode", {"batch": b, "length": cfg.prompt_len, "new_tokens": cfg.new_tokens}) for b in cfg.decode]
        for e in entries:
            e["prefill"], e["decode"] = [], []
        for op, args in grid:
            log.info("%s %s", op, _cell_key(op, args))
            start = time.perf_counter()
            measured = _measure(clients, op, args, cfg)
            seconds = round(time.perf_counter() - start, 2)  # every model's repetitions of the cell, interleaved
            for e, cell in zip(entries, measured):
                e["wall_seconds"][f"{op} {_cell_key(op, args)} (all models)"] = seconds
                if op == "decode" and cell["status"] == "ok":  # each step reads every weight once
                    steps_per_s = cfg.new_tokens / cell["seconds"]["median"]
                    cell["bandwidth_gb_s"] = e["artefact"]["weight_bytes"] * steps_per_s / 1e9
                e[op].append({"cell": _cell_key(op, args), **args, **cell})
    except KeyboardInterrupt:  # stop the workers now rather than wait for their current measurement
        for c in clients:
            c.kill()
        raise
    finally:
        for c in clients:
            c.close()
    for i, e in enumerate(entries):
        e["baseline"] = i == 0
        e["ratios"] = ratios(e, entries[0])
        ref = next(x for x in entries if x["backend"] == e["backend"])  # the first model on this runtime
        e["runtime_baseline"] = ref["label"]
        e["ratios_same_runtime"] = None if ref is e else same_runtime_ratios(e, ref, entries[0])
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "surgeon-export benchmark",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(cfg.device, resolve_dtype(cfg.dtype, cfg.device)),
        "config": {**asdict(cfg), "models": [asdict(m) for m in cfg.models]},
        "models": entries,
    }


def _checked_share(m: ModelSpec, mine: InlineClient | ProcessClient, theirs: InlineClient | ProcessClient,
                   shared: dict, ppl: PplConfig) -> dict:
    """``m``'s perplexity: the shared row's, when both agree on the first ``m.check_windows`` windows within
    :data:`SHARE_TOLERANCE` (recorded as ``check``); else ``m``'s own over every window of the protocol."""
    windows = m.check_windows if ppl.windows is None else min(m.check_windows, ppl.windows)
    few = {**asdict(ppl), "windows": windows, "progress": False}
    own, other = mine.call({"op": "perplexity", **few}), theirs.call({"op": "perplexity", **few})
    difference = abs(own["perplexity"] / other["perplexity"] - 1)
    check = {"windows": windows, "perplexity": own["perplexity"], "against": other["perplexity"],
             "relative_difference": difference, "tolerance": SHARE_TOLERANCE}
    if difference <= SHARE_TOLERANCE:
        return {**shared, "shared_from": m.perplexity, "check": check}
    log.warning("%s: perplexity on %d windows differs from %s's by %.1e (over %.0e): evaluated in full",
                m.label, windows, m.perplexity, difference, SHARE_TOLERANCE)
    return {**mine.call({"op": "perplexity", **asdict(ppl), "progress": False}), "check": check}


def bench(cfg: BenchConfig, out: Path, baseline: Path | None = None, max_regression: float = 0.05,
          force: bool = False) -> dict:
    """Run the benchmark, apply the regression gate if a stored result is given, write every file.

    Args:
        cfg: what to measure.
        out: the JSON file; markdown and plots go beside it (:func:`benchmarks.report.write_outputs`).
        baseline: a stored result to gate against; read and checked before anything is measured.
        max_regression: allowed worsening of each gated metric, as a fraction (0.05 is 5%).
        force: replace an existing ``out`` (refused otherwise, before anything is measured).

    Returns the result document, with ``gate`` (``passed`` false on a regression) when ``baseline``.
    """
    stored = None
    if baseline is not None:
        stored = load_baseline(baseline)
        check_comparable(stored, [m.label for m in cfg.models])
    if out.suffix != ".json":
        raise SurgeonError(f"--out must name a .json file, got {out}")
    if out.exists() and not force:
        raise SurgeonError(f"result file exists: {out} (use --force to replace it)")
    check_writable(out, "result")
    cfg.validate()
    result = run_benchmark(cfg)
    result["gate"] = None if stored is None else compare(result, stored, max_regression, str(baseline))
    write_outputs(result, out)  # disk full or read-only: one line naming ``out``
    return result
