"""The model card (``README.md`` with Hugging Face metadata) written beside every checkpoint and export.

One writer for every output (prune ``--out``, shrink, streamed pruning, ONNX, pack, densify, GGUF),
called inside each writer's temporary directory so the card is renamed into place with the rest.
The card says where the model came from, how it was made and what was measured, from the report
the writer already has (``surgeon_report.json``); nothing is claimed that is not in it.

The metadata block follows the Hub's model card format (``base_model``, ``library_name``, ``tags``,
``license``, ``pipeline_tag``). ``base_model`` and ``license`` are only written when known: for the
default model, or inherited from a source directory whose own card (written by us) names them.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from base.files import write_file

CARD_FILE = "README.md"
TAG = "surgeon-export"
# The default model (base/loading.py) on the Hub, and its licence.
DEFAULT_BASE = ("SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")


def command_line() -> str | None:
    """The CLI command being run (None when called from Python)."""
    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    if prog in ("surgeon-export", "__main__.py", "cli.py"):
        return shlex.join(["surgeon-export", *sys.argv[1:]])
    return None


def read_front_matter(path: Path) -> dict[str, Any]:
    """The YAML metadata block at the top of a model card ({} when there is none or it is malformed)."""
    import yaml

    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return {}
    if not text.startswith("---\n"):
        return {}
    end = text.find("\n---", 4)
    if end < 0:
        return {}
    try:
        data = yaml.safe_load(text[4:end])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def lineage(source: str | None, source_dir: Path | None) -> tuple[str | None, str | None]:
    """``(base_model, license)`` when known: the default model's, or those in our own card beside the source."""
    if source and source.startswith(DEFAULT_BASE[0]):
        return DEFAULT_BASE[1], DEFAULT_BASE[2]
    if source_dir is not None and source_dir.is_dir():
        meta = read_front_matter(source_dir / CARD_FILE)
        ours = TAG in (meta.get("tags") or [])
        base = meta.get("base_model") if ours else None
        return (str(base) if base else None), (str(meta["license"]) if meta.get("license") else None)
    return None, None


def _yaml_block(meta: dict[str, Any]) -> str:
    lines = ["---"]
    for key, value in meta.items():
        if value is None:
            continue
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines.extend(f"- {json.dumps(v)}" for v in value)
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines + ["---", ""])


def shape_runs(layers: Iterable[dict]) -> list[str]:
    """Per-layer sizes as runs of equal layers: ``layers 0-29: MLP 1126, 9 heads, 3 KV heads``."""
    rows = [(int(x["intermediate_size"]), int(x["num_attention_heads"]), int(x["num_key_value_heads"])) for x in layers]
    out, start = [], 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] != rows[start]:
            span = f"layer {start}" if i - 1 == start else f"layers {start}-{i - 1}"
            mlp, heads, kv = rows[start]
            out.append(f"{span}: MLP width {mlp}, {heads} query heads, {kv} KV heads")
            start = i
    return out


def _is_shapes(layers: Any) -> bool:
    """A report's ``layers`` holds per-layer sizes after shrinking (pruners put per-linear records there)."""
    return isinstance(layers, list) and bool(layers) and all(isinstance(x, dict) and "intermediate_size" in x
                                                              for x in layers)


def _method(report: dict) -> str | None:
    cfg = report.get("config") if isinstance(report.get("config"), dict) else {}
    method = report.get("method") or cfg.get("method")
    if not method:
        return None
    bits = [str(method)]
    for key in ("structured", "sparsity", "pattern", "allocation", "shots"):
        value = cfg.get(key, report.get(key))
        if value is not None:
            bits.append(f"{key} {value}")
    refine = cfg.get("refine")
    if refine:
        bits.append(f"refine {refine.get('method', refine) if isinstance(refine, dict) else refine}")
    return ", ".join(bits)


def _kept(report: dict) -> str | None:
    shrink = report.get("shrink")
    if isinstance(shrink, dict) and shrink.get("remaining_fraction") is not None:
        return (f"{shrink['remaining_fraction']:.2%} of the decoder-linear weights kept "
                f"({shrink['decoder_linear_params_after']:,} of {shrink['decoder_linear_params_before']:,})")
    if report.get("saved_sparsity") is not None:
        return f"{1 - report['saved_sparsity']:.2%} of the decoder-linear weights non-zero (counted in the saved tensors)"
    return None


def _measured(report: dict) -> list[str]:
    out = []
    ppl = report.get("perplexity")
    if isinstance(ppl, dict) and ppl.get("perplexity") is not None:
        windows = f", {ppl['windows']} windows" if ppl.get("windows") else ""
        out.append(f"perplexity {ppl['perplexity']:.2f} (WikiText-2 test{windows}, measured before saving)")
    elif isinstance(ppl, (int, float)):
        out.append(f"perplexity {ppl:.2f}")
    for item in report.get("measured", []) or []:  # lines added after the write (e.g. the main job's benchmark)
        out.append(str(item))
    return out


def model_card(*, title: str, source: str | None, report: dict | None = None, library: str = "transformers",
               tags: Iterable[str] = (), source_dir: Path | None = None, usage: Iterable[str] = (),
               notes: Iterable[str] = ()) -> str:
    """The card's text: metadata block, then source, method, kept fraction, shapes, measurements, command."""
    report = report or {}
    base, licence = lineage(source, source_dir)
    method = _method(report)
    tag_list = [TAG, *tags]
    if method:
        tag_list += ["pruned", method.split(",")[0]]
    meta = {"base_model": base, "library_name": library, "license": licence,
            "pipeline_tag": "text-generation", "tags": list(dict.fromkeys(tag_list))}
    lines = [_yaml_block(meta), f"# {title}", ""]
    lines.append(f"Written by surgeon-export from `{source}`." if source else "Written by surgeon-export.")
    lines.append("")
    facts = []
    if method:
        facts.append(f"method: {method}")
    if report.get("calibration"):
        facts.append(f"calibration: {report['calibration']}")
    kept = _kept(report)
    if kept:
        facts.append(kept)
    if report.get("checkpoint_format"):
        facts.append(f"checkpoint format: {report['checkpoint_format']}")
    facts += list(notes)
    if facts:
        lines += ["## How it was made", ""] + [f"- {f}" for f in facts] + [""]
    if _is_shapes(report.get("layers")):
        lines += ["## Per-layer shapes", ""] + [f"- {r}" for r in shape_runs(report["layers"])] + [""]
    measured = _measured(report)
    if measured:
        lines += ["## Measured", ""] + [f"- {m}" for m in measured] + [""]
    usage = list(usage)
    if usage:
        lines += ["## Use", ""] + list(usage) + [""]
    command = report.get("command") or command_line()
    lines += ["## Command", "", f"    {command}" if command else "Written through the Python API (surgeon_export).", ""]
    return "\n".join(lines)


def write_card(directory: Path, name: str = CARD_FILE, **kwargs: Any) -> str:
    """Write :func:`model_card` as ``directory/name`` (inside a writer's temporary directory); returns the text."""
    text = model_card(**kwargs)
    (directory / name).write_text(text)
    return text


def add_measurements(directory: Path, lines: list[str]) -> None:
    """Add numbers measured after the write (e.g. the main job's benchmark) to the card and the report.

    Each file is rewritten atomically (:func:`base.files.write_file`), so a reader sees the old or the
    new file, never half of one.
    """
    from base.formats import REPORT_FILE

    report_path = directory / REPORT_FILE
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        report["measured"] = [*(report.get("measured") or []), *lines]
        write_file(report_path, json.dumps(report, indent=2))
    card = directory / CARD_FILE
    if card.is_file():
        write_file(card, card.read_text().rstrip("\n") + "\n\n## Measured after writing\n\n"
                + "".join(f"- {line}\n" for line in lines))


def benchmark_lines(result: dict, label: str) -> list[str]:
    """What a benchmark (benchmarks/run.py result) measured for the model ``label``, against the first model."""
    env = result.get("environment") or {}
    where = f"{env.get('device', 'cpu')}, {env.get('threads', '?')} thread(s), torch {env.get('torch', '?')}"
    out = []
    for model in result.get("models", []):
        if model.get("label") != label:
            continue
        ppl = model.get("perplexity") or {}
        if ppl.get("perplexity") is not None:
            out.append(f"perplexity {ppl['perplexity']:.2f} (WikiText-2 test, {ppl.get('windows')} windows of "
                       f"{ppl.get('seq_len')} tokens)")
        ratios = model.get("ratios") or {}
        for kind in ("prefill", "decode"):
            for cell, r in (ratios.get(kind) or {}).items():
                if r.get("throughput") is not None:
                    out.append(f"{kind} {cell}: {r['throughput']:.2f}x the throughput of "
                               f"{result['models'][0].get('label')} ({where})")
    return out
