"""The pruning sweep: methods x targets on the protocol, one subprocess per cell.

Each cell runs ``surgeon-export prune ... --json`` in its own process (so its peak resident memory
is its own) and records perplexity, measured sparsity, prune time and peak memory. Results go to
``benchmarks/results/prune_sweep.json`` and a markdown table beside it, written atomically and
after every cell, so an interrupted sweep keeps the cells it finished and ``--resume`` skips them.

When the results go to ``benchmarks/results/prune_runs/`` (the default), the summary over every
recorded run (:mod:`benchmarks.prune_report`: ``SUMMARY.md`` and ``ppl_vs_size.png``) is rewritten
after every cell too, so one command regenerates the protocol sweep with its tables and plots.

Usage::

    python -m benchmarks.prune_sweep --preset protocol --resume     # the whole sweep, hours on 2 cores
    python -m benchmarks.prune_sweep --preset structured --threads 2
    python -m benchmarks.prune_sweep --cells "sparsegpt:0.5,surgeon:2:4,wanda:2:4+sds,surgeon:s0.8@uniform"
    python -m benchmarks.prune_sweep --preset sds --bench torch,onnxruntime,torch-24,torch-csr

With ``--bench BACKENDS`` each cell also keeps its pruned model, builds the artefact each backend
runs (the checkpoint itself for ``torch``, an ONNX export for ``onnxruntime``, a 2:4 pack for
``torch-24`` and ``torch-24-sparse``, a CSR pack for ``torch-csr``) and measures them with ``surgeon-export bench`` against
the dense model in the same run (and the dense model's own ONNX export beside the pruned one, so
ONNX Runtime is also compared with ONNX Runtime). A backend that does not apply to a cell (2:4 packs
of unstructured masks, sparse packs of structurally pruned models) is recorded as skipped, with the
reason; a failing export or benchmark is recorded as that backend's error, and the sweep goes on.
The cell records hold the ratios; the full benchmark documents (JSON, markdown, plots) go to
``<out stem>.bench/<cell>.json`` beside ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from base.env import environment
from base.files import write_file
from benchmarks import prune_report

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = RESULTS / "prune_runs"
SCHEMA_VERSION = 1

PRESETS: dict[str, list[str]] = {
    "unstructured": [f"{m}:{t}" for t in ("0.5", "2:4", "0.6") for m in ("magnitude", "wanda", "sparsegpt", "surgeon")],
    # Every method removes the same MLP channels in every layer (the reference channel baseline's
    # allocation), so the scores and updates are compared on exactly the same coupled groups.
    "structured": [f"{m}:s{r}@uniform" for r in ("0.9", "0.8", "0.7", "0.6", "0.5") for m in ("magnitude", "wanda", "surgeon")],
    "sds": [f"{m}:{t}{r}" for t in ("2:4", "0.5") for m in ("sparsegpt", "wanda") for r in ("", "+sds")],
}
PRESETS["protocol"] = PRESETS["unstructured"] + PRESETS["structured"] + [c for c in PRESETS["sds"] if c.endswith("+sds")]


def cell_args(cell: str) -> list[str]:
    """``"sparsegpt:0.5"`` / ``"surgeon:2:4"`` / ``"wanda:s0.8"`` (structured, 80% kept) -> CLI options;
    a ``+sds`` suffix adds SDS refinement (``"wanda:2:4+sds"``), an ``@uniform`` / ``@global`` suffix
    the allocation (``"surgeon:s0.8@uniform"``)."""
    if "@" in cell:
        cell, allocation = cell.rsplit("@", 1)
        return [*cell_args(cell), "--allocation", allocation]
    if cell.endswith("+sds"):
        return [*cell_args(cell.removesuffix("+sds")), "--refine", "sds"]
    method, target = cell.split(":", 1)
    if target.startswith("s"):
        return ["--method", method, "--structured", target[1:]]
    if ":" in target:
        return ["--method", method, "--pattern", target]
    return ["--method", method, "--sparsity", target]


BENCH_BACKENDS = ("torch", "onnxruntime", "torch-24", "torch-24-sparse", "torch-csr")


def cell_target(cell: str) -> str:
    """``"wanda:4:8+sds@global"`` -> ``"4:8"``: the cell's sparsity target as written."""
    return cell.split("@", 1)[0].removesuffix("+sds").split(":", 1)[1]


def cell_kind(cell: str) -> str:
    """``"structured"``, ``"N:M"`` or ``"unstructured"``: what a cell's target removes."""
    target = cell_target(cell)
    return "structured" if target.startswith("s") else ("N:M" if ":" in target else "unstructured")


def bench_skip(backend: str, kind: str) -> str | None:
    """Why ``backend`` has nothing to measure for a cell of ``kind``, or None when it applies."""
    if backend.startswith("torch-24") and kind != "N:M":
        return f"{backend} runs N:M packs; this cell's mask has no N:M pattern"
    if backend == "torch-csr" and kind == "structured":
        return "structured pruning leaves smaller dense matrices, no zeros to store sparsely"
    return None


def parse_bench(text: str | None) -> list[str]:
    if not text:
        return []
    backends = [b.strip() for b in text.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BENCH_BACKENDS]
    if unknown or not backends:
        raise SystemExit(f"error: --bench takes a comma-separated subset of {', '.join(BENCH_BACKENDS)}; got {text!r}")
    return list(dict.fromkeys(backends))


def _cli(args: list[str], threads: int | None) -> str | None:
    """Run one ``surgeon-export`` command; its last error line on failure, else None."""
    extra = ["--threads", str(threads)] if threads is not None else []
    out = subprocess.run([sys.executable, "-m", "surgeon_export.cli", *args, "--quiet", *extra],
                         capture_output=True, text=True, check=False)
    if out.returncode == 0:
        return None
    lines = [ln.strip(" │╭╮╰╯─") for ln in out.stderr.splitlines()]  # typer draws usage errors in a box
    return ([ln for ln in lines if ln] or [f"exit code {out.returncode}"])[-1]


def _slug(cell: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in cell)


def bench_summary(doc: dict) -> dict:
    """Per pruned artefact of a benchmark document: backend, size and speed ratios.

    ``vs_dense`` ratios are to dense torch (the run's first model); for ONNX Runtime artefacts
    ``vs_same_backend`` divides by the dense model's ONNX export measured in the same run.
    Latency ratios below 1 and throughput ratios above 1 are faster.
    """
    models = {m["label"]: m for m in doc["models"]}

    def speed(r: dict) -> dict:
        return {"prefill_latency": {k: v and v["latency"] for k, v in r["prefill"].items()},
                "decode_throughput": {k: v and v["throughput"] for k, v in r["decode"].items()}}

    out = {}
    for label, m in models.items():
        if m["baseline"] or label.startswith("dense"):
            continue
        r = m["ratios"]
        entry = {"backend": m["backend"], "bytes_on_disk": r["bytes_on_disk"], "vs_dense": speed(r)}
        twin = models.get("dense-ort") if m["backend"] == "onnxruntime" else None
        if twin is not None:
            t = speed(twin["ratios"])
            mine = entry["vs_dense"]
            entry["vs_same_backend"] = {
                kind: {k: (v / t[kind][k] if v and t[kind].get(k) else None) for k, v in cells.items()}
                for kind, cells in mine.items()}
            entry["bytes_vs_same_backend"] = r["bytes_on_disk"] / twin["ratios"]["bytes_on_disk"]
        out[label] = entry
    return out


def bench_cell(cell: str, model_dir: Path, backends: list[str], work: Path, out_json: Path, threads: int,
               bench_args: list[str], dense: str | None = None) -> dict:
    """Build each backend's artefact of a pruned model and benchmark them all against ``dense`` (the
    unpruned model; None: the default one) in one run."""
    kind = cell_kind(cell)
    record: dict = {"skipped": {}, "errors": {}}
    models: list[tuple[str, str, str]] = [("dense", dense or "default", "torch")]
    for backend in backends:
        reason = bench_skip(backend, kind)
        if reason is not None:
            record["skipped"][backend] = reason
            continue
        if backend == "torch":
            models.append(("pruned", str(model_dir), "torch"))
        elif backend == "onnxruntime":
            dense_onnx = work / "dense-onnx"  # exported once per sweep
            if not dense_onnx.is_dir():
                if (err := _cli(["onnx", *([dense] if dense else []), "--out", str(dense_onnx)], threads)) is not None:
                    record["errors"][backend] = f"dense ONNX export: {err}"
                    continue
            if (err := _cli(["onnx", str(model_dir), "--out", str(model_dir.parent / "onnx")], threads)) is not None:
                record["errors"][backend] = f"ONNX export: {err}"
                continue
            models += [("dense-ort", str(dense_onnx), "onnxruntime"), ("pruned-ort", str(model_dir.parent / "onnx"), "onnxruntime")]
        else:
            layout = cell_target(cell) if backend.startswith("torch-24") else "csr"  # the cell's N:M pattern
            packed = model_dir.parent / ("torch-24" if backend.startswith("torch-24") else backend)  # one N:M pack for both
            if not packed.is_dir() and (err := _cli(["pack", str(model_dir), "--format", layout, "--out", str(packed)],
                                                    None)) is not None:
                record["errors"][backend] = f"pack --format {layout}: {err}"
                continue
            models.append((f"pruned-{backend.removeprefix('torch-')}", str(packed), backend))
    if len(models) == 1:
        return record
    args = ["bench", *(f"{label}={path}" for label, path, _ in models)]
    args += [x for _, _, backend in models for x in ("--backend", backend)]
    args += ["--no-ppl", "--out", str(out_json), *bench_args]
    if (err := _cli(args, threads)) is not None:
        record["errors"]["bench"] = err
        return record
    doc = json.loads(out_json.read_text())
    record["file"] = f"{out_json.parent.name}/{out_json.name}"  # beside the sweep's JSON
    record["device"] = doc["environment"].get("device")
    record["artefacts"] = bench_summary(doc)
    return record


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [
        f"Pruning sweep on {results['model']} ({env['device']}, torch {env['torch']}, transformers "
        f"{env['transformers']}, {env['threads']} threads, {env['date']}, commit {env['git_commit']}).",
        "",
        "| cell | perplexity | measured sparsity | prune s | total s | peak RSS MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for cell, r in results["cells"].items():
        if "error" in r:
            lines.append(f"| {cell} | failed: {r['error']} | | | | |")
            continue
        ppl = "not evaluated" if r["perplexity"] is None else f"{r['perplexity']:.2f}"
        lines.append(
            f"| {cell} | {ppl} | {r['sparsity']:.2%} | {r['prune_seconds']:.0f} | "
            f"{r['wall_seconds']:.0f} | {r['peak_rss_mib']:.0f} |"
        )
    lines += prune_report.bench_table(results["cells"])
    return "\n".join(lines) + "\n"


def run_cell(cell: str, extra: list[str], threads: int, save_to: Path | None = None, model: str | None = None) -> dict:
    cmd = [sys.executable, "-m", "surgeon_export.cli", "prune", *([model] if model else []), *cell_args(cell), "--json",
           "--quiet", "--threads", str(threads), *extra]
    if save_to is not None:
        cmd += ["--out", str(save_to)]
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1], "command": cmd[2:]}
    payload = json.loads(out.stdout)
    return {
        "perplexity": (payload.get("perplexity") or {}).get("perplexity"),  # None with --no-eval
        "sparsity": payload["sparsity"],
        "prune_seconds": payload["seconds"],
        "wall_seconds": wall,
        "peak_rss_mib": payload["peak_rss_mib"],
        "calibration": payload["calibration"],
        "config": payload["config"],
        "shots": payload.get("shots"),
        "refine": payload.get("refine"),
        "layer_seconds": payload.get("layer_seconds"),
        "command": cmd[2:],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS))
    parser.add_argument("--cells", help="comma-separated cells, e.g. sparsegpt:0.5,surgeon:2:4,wanda:s0.8")
    parser.add_argument("--model", help="model to prune (a directory or .gguf file; default: the default model)")
    parser.add_argument("--out", type=Path, default=RUNS / "prune_sweep.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resume", action="store_true", help="skip cells already in --out")
    parser.add_argument("--bench", help=f"after each cell, benchmark its pruned model on these backends "
                                         f"(comma-separated: {', '.join(BENCH_BACKENDS)})")
    parser.add_argument("--bench-args", default="", help="further options for every `surgeon-export bench` "
                                                          "(e.g. \"--prefill 1x128 --decode 1 --repeat 5\")")
    parser.add_argument("--work", type=Path, help="where cells' models and artefacts are kept while benchmarked "
                                                   "(default: a temporary directory, removed at the end)")
    parser.add_argument("extra", nargs="*", help="further options passed to every prune command (after --)")
    args = parser.parse_args(argv)
    backends = parse_bench(args.bench)
    try:
        bench_args = shlex.split(args.bench_args)
    except ValueError as exc:
        parser.error(f"--bench-args: {exc}")
    cells = PRESETS[args.preset] if args.preset else []
    if args.cells:
        cells += [c.strip() for c in args.cells.split(",") if c.strip()]
    if not cells:
        parser.error("give --preset or --cells")
    results = {"schema_version": SCHEMA_VERSION, "model": args.model or "SmolLM2-135M-Instruct (default)", "cells": {}}
    if args.resume and args.out.is_file():
        results = json.loads(args.out.read_text())
    results["environment"] = environment()
    results["environment"]["threads"] = args.threads
    work = args.work or Path(tempfile.mkdtemp(prefix="prune-sweep-"))
    try:
        for cell in cells:
            done = results["cells"].get(cell)
            if done is not None and "error" not in done and (not backends or "bench" in done):
                continue
            print(f"[sweep] {cell} ...", file=sys.stderr, flush=True)
            cell_dir = work / _slug(cell)
            shutil.rmtree(cell_dir, ignore_errors=True)
            save_to = cell_dir / "model" if backends else None
            record = run_cell(cell, args.extra, args.threads, save_to, args.model)
            print(f"[sweep] {cell}: {record.get('perplexity', record.get('error'))}", file=sys.stderr, flush=True)
            if backends and "error" not in record:
                print(f"[sweep] {cell}: benchmarking on {', '.join(backends)} ...", file=sys.stderr, flush=True)
                out_json = args.out.with_name(args.out.stem + ".bench") / f"{_slug(cell)}.json"
                out_json.parent.mkdir(parents=True, exist_ok=True)
                record["bench"] = bench_cell(cell, save_to, backends, work, out_json, args.threads, bench_args, args.model)
            shutil.rmtree(cell_dir, ignore_errors=True)
            results["cells"][cell] = record
            write_file(args.out, json.dumps(results, indent=2))
            write_file(args.out.with_suffix(".md"), markdown(results))
            if args.out.parent.resolve() == RUNS.resolve():
                prune_report.main(["--runs", str(RUNS)])
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
