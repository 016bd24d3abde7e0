"""One table and one plot over every recorded pruning run.

Reads every JSON file in ``benchmarks/results/prune_runs/`` (single ``surgeon-export prune --json``
payloads and :mod:`benchmarks.prune_sweep` files alike), and writes ``SUMMARY.md`` and
``ppl_vs_size.png`` beside them: perplexity on the protocol against the remaining fraction of
decoder-linear weights, one line per method and setting. Regenerate with::

    python -m benchmarks.prune_report
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from matplotlib.figure import Figure

from base.files import write_file
from benchmarks.report import _png
from surgeon.sds import SDSConfig

RUNS = Path(__file__).resolve().parent / "results" / "prune_runs"
REFERENCES = {  # BENCHMARK_PROTOCOL.md, same protocol
    ("sparsegpt", "50%"): 50.65, ("sparsegpt", "2:4"): 82.74, ("sparsegpt", "60%"): 86.01,
    ("wanda", "50%"): 63.02, ("wanda", "2:4"): 180.45, ("wanda", "60%"): 154.66,
    ("magnitude", "50%"): 551.2, ("magnitude", "2:4"): 1625.4, ("magnitude", "60%"): 2937.2,
    ("wanda channels", "90% kept"): 37.64, ("wanda channels", "80% kept"): 51.34,
    ("LLM Surgeon (official code)", "90% kept"): 39.75, ("LLM Surgeon (official code)", "80% kept"): 399.3,
    ("LLM Surgeon (official code)", "2:4"): 86.48,
}


def _option(command: list[str], flag: str) -> str | None:
    return command[command.index(flag) + 1] if flag in command else None


def row(payload: dict, source: str) -> dict | None:
    """One run, normalised: method label, target label, remaining fraction, settings, measurements."""
    cfg = payload.get("config") or {}
    ppl = payload.get("perplexity")
    if isinstance(ppl, dict):
        ppl = ppl.get("perplexity")
    if ppl is None:
        return None
    command = payload.get("command") or []
    scoring = cfg.get("scoring")
    settings = []
    if scoring is not None:  # SurgeonConfig: LLM Surgeon, or a baseline score on coupled groups
        if scoring == "surgeon":
            method = "LLM Surgeon"
            settings.append(f"{cfg.get('shots')} shots")
            if cfg.get("structured") is None:
                settings.append(f"correlation {cfg.get('correlation')}")
            if cfg.get("structured") is not None:
                settings.append(f"group cost {cfg.get('group_cost', 'sum')}")
        else:
            method = f"{scoring} channels" if cfg.get("allocation") == "uniform" else f"{scoring} groups"
        settings.append(cfg.get("allocation", ""))
    else:
        method = cfg.get("method", "?")
    if cfg.get("refine"):
        method += " + SDS"
        defaults = SDSConfig().to_dict()
        settings += [f"{k} {v}" for k, v in cfg["refine"].items() if defaults.get(k, v) != v]
    calibration = payload.get("calibration")
    if isinstance(calibration, str) and not calibration.endswith("wikitext-2/valid.txt"):
        settings.append(f"calibration {Path(calibration).name}")
    if cfg.get("structured") is not None:
        target, remaining = f"{cfg['structured']:.0%} kept", 1 - payload["sparsity"]
        kind = "structured"
    elif cfg.get("pattern"):
        target, remaining, kind = cfg["pattern"], 1 - payload["sparsity"], "N:M"
    else:
        target, remaining, kind = f"{cfg.get('sparsity', 0):.0%}", 1 - payload["sparsity"], "unstructured"
    calib = _option(command, "--calib-samples") or ("16" if scoring == "surgeon" else "64")
    env = payload.get("environment") or {}
    return {
        "method": method, "target": target, "kind": kind, "remaining": remaining, "perplexity": ppl,
        "settings": ", ".join(s for s in settings if s), "calibration_windows": int(calib),
        "prune_seconds": payload.get("prune_seconds", payload.get("seconds")),
        "peak_rss_mib": payload.get("peak_rss_mib"), "threads": _option(command, "--threads") or env.get("threads"),
        "commit": env.get("git_commit"), "source": source,
    }


def _target_key(target: str) -> tuple[int, float]:
    """Structured levels from most kept to least; sparsities and patterns from least removed."""
    if target.endswith("kept"):
        return 0, -float(target.split("%")[0])
    if target.endswith("%"):
        return 0, float(target[:-1])
    return 1, 0.0


def collect(directory: Path) -> list[dict]:
    return collect_all(directory)[0]


def notes(directory: Path) -> list[str]:
    """The ``note`` of every run file that has one, as markdown list items."""
    out = []
    for path in sorted(directory.glob("*.json")):
        note = json.loads(path.read_text()).get("note")
        if note:
            out.append(f"- {path.name}: {note}")
    return out


def collect_all(directory: Path) -> tuple[list[dict], dict[str, dict]]:
    """Every run as a row, and every benchmarked sweep cell (``"file: cell"`` -> cell record)."""
    rows, benched = [], {}
    for path in sorted(directory.glob("*.json")):
        data = json.loads(path.read_text())
        if "cells" in data:
            env = data.get("environment") or {}
            payloads = [{**c, "environment": env} for c in data["cells"].values() if "error" not in c]
            benched.update({f"{path.stem}: {c}": r for c, r in data["cells"].items() if "error" not in r and r.get("bench")})
        else:
            payloads = [data]
        rows += [r for r in (row(p, path.name) for p in payloads) if r is not None]
    order = {"unstructured": 0, "N:M": 1, "structured": 2}
    return sorted(rows, key=lambda r: (order[r["kind"]], _target_key(r["target"]), r["perplexity"])), benched


def markdown(rows: list[dict], benched: dict[str, dict] | None = None, file_notes: list[str] | None = None) -> str:
    lines = [
        "Every recorded pruning run on SmolLM2-135M-Instruct, BENCHMARK_PROTOCOL.md perplexity "
        "(WikiText-2 test, 64 x 512 tokens, float32; dense 29.53). Prune times are from a shared "
        "2-core CPU and only comparable within a run. Regenerate: `python -m benchmarks.prune_report`.",
        "",
        "| target | method | settings | perplexity | reference | calib windows | prune s | peak RSS MiB | file |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        ref = REFERENCES.get((r["method"], r["target"]))
        secs = f"{r['prune_seconds']:.0f}" if r["prune_seconds"] is not None else ""
        rss = f"{r['peak_rss_mib']:.0f}" if r["peak_rss_mib"] is not None else ""
        lines.append(
            f"| {r['target']} | {r['method']} | {r['settings']} | {r['perplexity']:.2f} | "
            f"{ref if ref is not None else ''} | {r['calibration_windows']} | {secs} | {rss} | {r['source']} |"
        )
    lines += pivot(rows)
    lines += bench_table(benched or {})
    if file_notes:
        lines += ["", "Notes on run files:", "", *file_notes]
    lines += ["", "References (same protocol, public reference code):", ""]
    lines += [f"- {m}, {t}: {v}" for (m, t), v in REFERENCES.items()]
    return "\n".join(lines) + "\n"


def pivot(rows: list[dict]) -> list[str]:
    """Best perplexity per target and method, one table per kind; the best of each row in bold."""
    lines: list[str] = []
    for kind, title in (("structured", "Structured (coupled groups removed; remaining fraction of decoder-linear weights)"),
                        ("unstructured", "Unstructured"), ("N:M", "Semi-structured")):
        best: dict[tuple[str, str], float] = {}
        for r in rows:
            if r["kind"] == kind:
                key = (r["target"], r["method"])
                best[key] = min(r["perplexity"], best.get(key, float("inf")))
        if not best:
            continue
        methods = sorted({m for _, m in best}, key=lambda m: (not m.startswith("LLM Surgeon"), m))
        targets = sorted({t for t, _ in best}, key=_target_key)
        lines += ["", f"### {title}: best perplexity per method", "",
                  "| target | " + " | ".join(methods) + " | references |", "| --- |" + " ---: |" * len(methods) + " --- |"]
        for t in targets:
            low = min(v for (tt, _), v in best.items() if tt == t)
            cells = []
            for m in methods:
                v = best.get((t, m))
                cells.append("" if v is None else (f"**{v:.2f}**" if v == low else f"{v:.2f}"))
            refs = "; ".join(f"{m} {v}" for (m, tt), v in REFERENCES.items() if tt == t)
            lines.append(f"| {t} | " + " | ".join(cells) + f" | {refs} |")
    return lines


def _fmt(v: float | None, digits: int = 3) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def bench_table(cells: dict[str, dict]) -> list[str]:
    """Size and speed per backend of every benchmarked cell (``prune_sweep --bench``), as table lines.

    Ratios to dense torch in the same benchmark run; for ONNX Runtime also to the dense model's own
    export (in brackets). Latency below 1 and tokens/s above 1 are faster.
    """
    benched = {c: r for c, r in cells.items() if r.get("bench")}
    if not benched:
        return []
    prefill = sorted({k for r in benched.values() for a in r["bench"].get("artefacts", {}).values()
                      for k in a["vs_dense"]["prefill_latency"]}, key=lambda k: [int(x) for x in k.split("x")])
    decode = sorted({k for r in benched.values() for a in r["bench"].get("artefacts", {}).values()
                     for k in a["vs_dense"]["decode_throughput"]}, key=lambda k: int(k[1:]))  # "b8"
    lines = ["", "### Size and speed per backend (ratios to dense torch, same run; ONNX Runtime: [to dense ONNX Runtime])", "",
             "| cell | perplexity | backend | file size | " + " | ".join(f"prefill {k} latency" for k in prefill)
             + (" | " if prefill and decode else "") + " | ".join(f"decode {k} tokens/s" for k in decode) + " | device | file |",
             "| --- | ---: | --- | ---: |" + " ---: |" * (len(prefill) + len(decode)) + " --- | --- |"]
    for cell, r in benched.items():
        b = r["bench"]
        ppl = "" if r.get("perplexity") is None else f"{r['perplexity']:.2f}"
        for label, a in b.get("artefacts", {}).items():
            same = a.get("vs_same_backend")

            def both(kind: str, key: str, a=a, same=same) -> str:
                mine = _fmt(a["vs_dense"][kind].get(key))
                return f"{mine} [{_fmt(same[kind].get(key))}]" if same and mine else mine

            size = _fmt(a["bytes_on_disk"]) + (f" [{_fmt(a['bytes_vs_same_backend'])}]" if same else "")
            cols = [both("prefill_latency", k) for k in prefill] + [both("decode_throughput", k) for k in decode]
            lines.append(f"| {cell} | {ppl} | {a['backend']} | {size} | " + " | ".join(cols)
                         + f" | {b.get('device', '')} | {b.get('file', '')} |")
        for backend, why in {**b.get("skipped", {}), **b.get("errors", {})}.items():
            kind = "skipped" if backend in b.get("skipped", {}) else "failed"
            lines.append(f"| {cell} | {ppl} | {backend} | {kind}: {why} |" + " |" * (len(prefill) + len(decode) + 2))
    return lines


def plot(rows: list[dict]) -> bytes | None:
    if not rows:
        return None
    fig = Figure(figsize=(11, 4.5))
    for ax, kinds, title in zip(fig.subplots(1, 2), (("unstructured", "N:M"), ("structured",)),
                                ("unstructured and 2:4", "structured (physically smaller)"), strict=True):
        series: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            if r["kind"] in kinds:
                label = r["method"] + (" (2:4)" if r["kind"] == "N:M" else "")
                series.setdefault(label, []).append((r["remaining"], r["perplexity"]))
        for label, pts in sorted(series.items()):
            best: dict[float, float] = {}
            for x, y in pts:  # best run per size
                best[round(x, 3)] = min(y, best.get(round(x, 3), float("inf")))
            xs = sorted(best)
            ax.plot(xs, [best[x] for x in xs], marker="o", label=label)
        ax.axhline(29.53, color="grey", linestyle=":", label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("remaining fraction of decoder-linear weights")
        ax.set_ylabel("perplexity (WikiText-2, protocol)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=RUNS)
    args = parser.parse_args(argv)
    if not args.runs.is_dir():
        print(f"error: no such directory: {args.runs}", file=sys.stderr)
        return 2
    rows, benched = collect_all(args.runs)
    write_file(args.runs / "SUMMARY.md", markdown(rows, benched, notes(args.runs)))
    png = plot(rows)
    if png is not None:
        write_file(args.runs / "ppl_vs_size.png", png)
    print(f"{len(rows)} runs -> {args.runs / 'SUMMARY.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
