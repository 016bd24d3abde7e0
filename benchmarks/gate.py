"""The CI gate: compare a fresh benchmark with a stored one and fail on regressions.

Speed is compared only through ratios measured within each run (model / baseline model of that
run), never through absolute times, which no two runs on a shared machine agree on. Perplexity is
deterministic, so each model's own perplexity is compared. A metric regresses when it is worse by
more than ``max_regression``: for lower-is-better metrics (perplexity, latency ratio)
``current / stored - 1``; for higher-is-better ones (tokens/s ratio) ``stored / current - 1``.
"""

from __future__ import annotations

from pathlib import Path

from base.errors import SurgeonError
from base.files import read_json

SCHEMA_VERSION = 1  # of the benchmark result document (docs/benchmarks.md); the gate reads this version only


def parse_tolerance(text: str) -> float:
    """``"5%"`` or ``"0.05"`` -> ``0.05``."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise SurgeonError(f"bad --max-regression {text!r}: give a percentage like 5% or a fraction like 0.05") from None
    if not 0 <= value < 10:
        raise SurgeonError(f"--max-regression must be between 0% and 1000%, got {text!r}")
    return value


def load_baseline(path: Path) -> dict:
    """Read and check a stored benchmark JSON (one-line SurgeonError when missing or malformed)."""
    if not path.is_file():
        raise SurgeonError(f"baseline file not found: {path}")
    doc = read_json(path)
    if not isinstance(doc, dict) or "schema_version" not in doc:
        raise SurgeonError(f"baseline file {path} is not a benchmark result (no schema_version)")
    if doc["schema_version"] != SCHEMA_VERSION:
        raise SurgeonError(
            f"baseline file {path} has schema_version {doc['schema_version']!r}; this version reads {SCHEMA_VERSION}")
    models = doc.get("models")
    ok = isinstance(models, list) and models and all(
        isinstance(m, dict) and isinstance(m.get("label"), str) and isinstance(m.get("ratios"), dict)
        and "perplexity" in m for m in models)
    if not ok:
        raise SurgeonError(f"baseline file {path} is malformed: 'models' must list entries with label, perplexity, ratios")
    return doc


def check_comparable(baseline: dict, labels: list[str]) -> None:
    """Before measuring: both runs must have the same reference (first) model, or no ratio compares."""
    stored = [m["label"] for m in baseline["models"]]
    if stored[0] != labels[0]:
        raise SurgeonError(
            f"baseline file's reference model is {stored[0]!r}, this run's is {labels[0]!r}; ratios would not "
            "compare (name models LABEL=PATH to match)")


def _number(entry: object, *keys: str) -> float | None:
    for key in keys:
        if not isinstance(entry, dict):
            return None
        entry = entry.get(key)
    return float(entry) if isinstance(entry, (int, float)) else None


def compare(current: dict, baseline: dict, max_regression: float, baseline_file: str = "") -> dict:
    """Every metric present in both documents, with its change and whether it regressed.

    Returns ``{"baseline_file", "max_regression", "passed", "rows": [{model, metric, stored,
    current, change, status}]}`` where ``change`` > 0 means worse.
    """
    stored = {m["label"]: m for m in baseline["models"]}
    rows = []
    for i, m in enumerate(current["models"]):
        old = stored.get(m["label"])
        if old is None:
            continue
        metrics = [("perplexity", _number(m, "perplexity", "perplexity"),
                    _number(old, "perplexity", "perplexity"), True)]
        if any(_number(m, "perplexity", k) != _number(old, "perplexity", k) for k in ("windows", "seq_len")):
            metrics = []  # different evaluation: not comparable
        if i > 0:  # the reference model's speed ratios are 1 by definition
            for kind, key, lower in (("prefill", "latency", True), ("decode", "throughput", False)):
                for cell in m["ratios"][kind]:
                    name = f"{kind} {cell} {'latency' if lower else 'tokens/s'} ratio"
                    metrics.append((name, _number(m["ratios"][kind], cell, key),
                                    _number(old["ratios"].get(kind), cell, key), lower))
        for name, new, ref, lower in metrics:
            if new is None or ref is None or new <= 0 or ref <= 0:
                continue
            change = new / ref - 1 if lower else ref / new - 1
            rows.append({"model": m["label"], "metric": name, "stored": ref, "current": new, "change": change,
                         "status": "regressed" if change > max_regression else "ok"})
    if not rows:
        raise SurgeonError(f"baseline file {baseline_file} shares no model and metric with this run; nothing to compare")
    return {"baseline_file": baseline_file, "max_regression": max_regression,
            "passed": all(r["status"] == "ok" for r in rows), "rows": rows}


def gate_table(gate: dict) -> str:
    """The gate's rows as a markdown table, worst first, with a verdict line."""
    verdict = "passed" if gate["passed"] else "FAILED"
    lines = [f"Regression gate vs {gate['baseline_file']} (max {gate['max_regression']:.1%}): **{verdict}**", "",
             "| model | metric | stored | current | change (+ is worse) | status |",
             "| --- | --- | ---: | ---: | ---: | --- |"]
    for r in sorted(gate["rows"], key=lambda r: -r["change"]):
        lines.append(f"| {r['model']} | {r['metric']} | {r['stored']:.4g} | {r['current']:.4g} | "
                     f"{r['change']:+.1%} | {r['status']} |")
    return "\n".join(lines)
