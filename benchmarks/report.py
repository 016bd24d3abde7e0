"""Turn a benchmark result into files: the JSON record, a markdown table and PNG plots.

Everything is rendered in memory first and each file is written atomically
(:func:`base.files.write_file`), the JSON last: a JSON file on disk is always complete, and its
presence means the markdown and plots next to it belong to it.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

from matplotlib.figure import Figure

from base.files import write_file
from benchmarks.gate import gate_table


def _mib(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:,.1f} MiB"


def _x(r: float | None, digits: int = 3) -> str:
    return "–" if r is None else f"{r:.{digits}f}×"


def _ppl(ppl: dict | None) -> str:
    """A row's perplexity; one shared from another row (the same weights, parity-checked) says whose, with
    the relative difference on the windows where a check ran (benchmarks/run.py: ``check_windows``); one
    taken from our cache says when it was measured (``cache_perplexity``)."""
    if ppl is None:
        return "–"
    check = ppl.get("check")
    notes = [f"= {ppl['shared_from']}" if ppl.get("shared_from") else "",
             f"{check['relative_difference']:.1e} on {check['windows']} windows" if check else "",
             f"cached: measured {ppl['cached']['measured'][:10]}" if ppl.get("cached") else ""]
    notes = [n for n in notes if n]
    return format(ppl["perplexity"], ".3f") + (f" ({', '.join(notes)})" if notes else "")


def _cell_ratio(model: dict, kind: str, cell: str, key: str) -> float | None:
    entry = model["ratios"][kind].get(cell)
    return None if entry is None else entry[key]


def markdown(result: dict) -> str:
    """Three tables (models, prefill, decode) plus the environment line and any gate result."""
    env, cfg, models = result["environment"], result["config"], result["models"]
    base = models[0]
    lines = [
        f"# Benchmark {result['created']}", "",
        f"{env['device']} ({env['device_type']}); torch {env['torch']}, transformers {env['transformers']}, "
        f"onnxruntime {env['onnxruntime']}; {env['dtype']}; threads: {base['environment']['threads']}; "
        f"commit {env['git_commit']}. Baseline: **{base['label']}**; ratios are to it, measured in this run. "
        f"{cfg['repeat']} repetitions after {cfg['warmup']} warm-up, interleaved between models; "
        f"peak memory: {base['memory_method']}.", "",
        "| model | backend | parameters | decoder-linear zeros | size on disk | size × | perplexity | ppl × |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in models:
        a, ppl = m["artefact"], m["perplexity"]
        lines.append(
            f"| {m['label']} | {m['backend']} | {a['parameters']['total']:,} | {a['sparsity']:.2%} | "
            f"{_mib(a['bytes_on_disk'])} | {_x(m['ratios']['bytes_on_disk'])} | "
            f"{_ppl(ppl)} | {_x(m['ratios']['perplexity'])} |")
    if cfg["prefill"]:
        lines += ["", "Prefill (one forward pass over a synthetic prompt):", "",
                  "| model | batch×length | median ms | min–max ms | tokens/s | peak memory | latency × | speed-up | FLOPs × |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for m in models:
            for c in m["prefill"]:
                lines.append(_row(m, "prefill", c, f"{c['batch']}×{c['length']}"))
    if cfg["decode"]:
        lines += ["", f"Decode ({cfg['new_tokens']} greedy KV-cache steps after a {cfg['prompt_len']}-token prompt):", "",
                  "| model | batch | median ms/step | min–max ms/step | tokens/s | peak memory | latency × | speed-up | FLOPs × |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for m in models:
            for c in m["decode"]:
                lines.append(_row(m, "decode", c, str(c["batch"]), steps=cfg["new_tokens"]))
    lines += _same_runtime_lines(models, cfg)
    lines += _kernel_lines(models)
    if result.get("gate"):
        lines += ["", gate_table(result["gate"])]
    return "\n".join(lines) + "\n"


def _same_runtime_lines(models: list[dict], cfg: dict) -> list[str]:
    """Each model against the first model on its own runtime: the speed-up pruning buys there."""
    rows = [m for m in models if m.get("ratios_same_runtime")]
    if not rows:
        return []
    cells = [("prefill", f"{b}x{t}", f"prefill {b}×{t}") for b, t in cfg["prefill"]]
    cells += [("decode", f"b{b}", f"decode b{b}") for b in cfg["decode"]]
    lines = ["", f"Against the first model on the same runtime (what pruning buys on each runtime; the ratios "
                 f"above are all to **{models[0]['label']}** on {models[0]['backend']}). Speed-up: tokens/s ratio.", "",
             "| model | backend | against | size × | ppl × | " + " | ".join(f"{c[2]} speed-up" for c in cells) + " |",
             "| --- | --- | --- | ---: | ---: | " + " | ".join("---:" for _ in cells) + " |"]
    for m in rows:
        r = m["ratios_same_runtime"]
        ppl = _x(r["perplexity"]) + ("" if r["perplexity_against"] == m["runtime_baseline"] or r["perplexity"] is None
                                     else f" (vs {r['perplexity_against']})")
        speed = [_x((r[kind].get(key) or {}).get("throughput"), 2) for kind, key, _ in cells]
        lines.append(f"| {m['label']} | {m['backend']} | {m['runtime_baseline']} | {_x(r['bytes_on_disk'])} | {ppl} | "
                     + " | ".join(speed) + " |")
    return lines


def _kernel_lines(models: list[dict]) -> list[str]:
    """Where the packed linears of compressed models ran: kernels, layers left dense, dense copies for small calls."""
    lines = []
    for m in models:
        a = m["artefact"]
        if "kernels" not in a:
            continue
        text = ", ".join(f"{k} {n}" for k, n in sorted(a["kernels"].items()))
        if a.get("fallbacks"):
            text += f"; {len(a['fallbacks'])} left dense on the GPU, e.g. {next(iter(a['fallbacks'].values()))}"
        if a.get("dense_below"):
            counts = Counter(a["dense_below"].values())
            text += "; dense copy for calls under " + ", ".join(f"{t} tokens ({n} layers)" for t, n in sorted(counts.items()))
        lines.append(f"- **{m['label']}** ({m['backend']}): {text}")
    return ["", "Packed linears, where they ran:", "", *lines] if lines else []


def _row(m: dict, kind: str, c: dict, cell: str, steps: int = 1) -> str:
    if c["status"] != "ok":
        return f"| {m['label']} | {cell} | skipped: {c['reason']} | | | | | | |"
    s = c["seconds"]
    ms = [1000 * v / steps for v in (s["median"], s["min"], s["max"])]
    return (f"| {m['label']} | {cell} | {ms[0]:.2f} | {ms[1]:.2f}–{ms[2]:.2f} | "
            f"{c['tokens_per_s']['median']:,.0f} | {_mib(c['peak_memory_bytes'])} | "
            f"{_x(_cell_ratio(m, kind, c['cell'], 'latency'))} | "
            f"{_x(_cell_ratio(m, kind, c['cell'], 'throughput'), 2)} | "
            f"{_x(_cell_ratio(m, kind, c['cell'], 'flops'))} |")


def plot_quality(result: dict) -> bytes | None:
    """Perplexity against remaining decoder-linear weights (nonzeros relative to the baseline's), a line per method.

    Each method's line starts at the baseline (when the baseline has perplexity), the unpruned end
    of every curve; models without a pruning record are grouped as ``unpruned``.
    """
    base = result["models"][0]
    points: dict[str, list[tuple[float, float, str]]] = {}
    for m in result["models"][1:]:
        if m["perplexity"] is None or m["ratios"]["remaining_decoder_linear"] is None:
            continue
        method = (m["artefact"].get("pruning") or {}).get("method") or "unpruned"
        points.setdefault(method, []).append(
            (100 * m["ratios"]["remaining_decoder_linear"], m["perplexity"]["perplexity"], m["label"]))
    anchor = None if base["perplexity"] is None else (100.0, base["perplexity"]["perplexity"], base["label"])
    if not points and anchor is None:
        return None
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    for method, pts in sorted(points.items()):
        pts = sorted(pts + ([anchor] if anchor else []), reverse=True)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        for x, y, label in pts:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if anchor:
        ax.plot([anchor[0]], [anchor[1]], marker="*", markersize=12, color="black", linestyle="",
                label=f"baseline ({anchor[2]})")
    ys = [p[1] for pts in points.values() for p in pts] + ([anchor[1]] if anchor else [])
    ax.set(xlabel="remaining decoder-linear weights (% of baseline nonzeros)", ylabel="perplexity",
           yscale="log" if max(ys) > 10 * min(ys) else "linear", title="Perplexity vs remaining size")
    ax.legend(fontsize=8)
    return _png(fig)


def plot_speedup(result: dict) -> bytes | None:
    """Speed-up (tokens/s ratio to the baseline) per grid cell, one bar per model and backend."""
    models = result["models"][1:]
    cells = [("prefill", c["cell"], f"prefill {c['batch']}×{c['length']}") for c in result["models"][0]["prefill"]]
    cells += [("decode", c["cell"], f"decode b{c['batch']}") for c in result["models"][0]["decode"]]
    if not models or not cells:
        return None
    fig = Figure(figsize=(max(6.0, 1.2 * len(cells) * max(1, len(models)) ** 0.5), 4), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(models)
    for j, m in enumerate(models):
        heights = [_cell_ratio(m, kind, key, "throughput") or 0.0 for kind, key, _ in cells]
        ax.bar([i + j * width for i in range(len(cells))], heights, width, label=f"{m['label']} ({m['backend']})")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(cells))], [c[2] for c in cells], fontsize=8)
    ax.set(ylabel=f"speed-up vs {result['models'][0]['label']}", title="Speed-up by batch × length (0: skipped)")
    ax.legend(fontsize=8)
    return _png(fig)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return buf.getvalue()


def write_outputs(result: dict, json_path: Path) -> list[Path]:
    """Write ``json_path``, a ``.md`` beside it and ``.<plot>.png`` plots; returns the paths written.

    Args:
        result: a document from :func:`benchmarks.run.run_benchmark` (with ``gate`` if one ran).
        json_path: where the JSON goes; the other files share its stem.
    """
    stem = json_path.with_suffix("")
    files: dict[Path, bytes] = {}
    for name, png in (("ppl_vs_size", plot_quality(result)), ("speedup", plot_speedup(result))):
        if png is not None:
            files[stem.with_name(f"{stem.name}.{name}.png")] = png
    md_path = stem.with_name(f"{stem.name}.md")
    result["outputs"] = {"markdown": md_path.name, "plots": [p.name for p in files]}
    files[md_path] = markdown(result).encode()
    files[json_path] = (json.dumps(result, indent=2) + "\n").encode()  # last: complete or absent
    for path, data in files.items():  # a failed write is one line naming the result
        write_file(path, data, target=json_path)
    return list(files)
