"""The README's figures are recorded ones: every decimal figure of its measured paragraphs appears, at the
precision printed, in the recorded results it cites (or, where a bullet cites none, anywhere in
benchmarks/results/); the main job's time is the latest recorded run's."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CITED = re.compile(r"benchmarks/results/[\w./-]+\.(?:json|md)")
DECIMAL = re.compile(r"(?<![\w.])(\d+\.\d+)(?![\w.]*\d)( ?GiB)?")  # 45.37, 0.84x, 3.49 GiB
IGNORED = re.compile(r"\b\d+\.\d+\.\d+\b|v\d+\.\d+|\d+\.\d+(?= ?(?:GB|MB|GiB|MiB) (?:of|disk|RAM))|3\.\d+ ?[`)]")


def numbers(value: object) -> list[float]:
    """Every number in a JSON document, and in the strings it holds."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in numbers(v)] + [x for k in value for x in numbers(k)]
    if isinstance(value, list):
        return [x for v in value for x in numbers(v)]
    if isinstance(value, str):
        return [float(m) for m in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", value)]
    return []


def recorded(path: Path) -> list[float]:
    text = path.read_text()
    return numbers(json.loads(text)) if path.suffix == ".json" else numbers(text)


def matches(printed: str, values: list[float]) -> bool:
    """``printed`` (e.g. "45.37") is one of ``values`` rounded to its decimals (either rounding direction of a
    half, a ratio printed as "x" included)."""
    decimals = len(printed.split(".")[1])
    target = float(printed)
    return any(abs(v - target) <= 0.5 * 10**-decimals + 1e-9 for v in values)


def paragraphs(section: str) -> list[str]:
    """The bullets (and plain paragraphs) of a README section, each one string."""
    parts = re.split(r"\n(?=- )|\n\n", section)
    return [" ".join(p.split()) for p in parts if p.strip()]


def section(text: str, title: str) -> str:
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def test_measured_figures_are_recorded() -> None:
    text = (ROOT / "README.md").read_text()
    everything = [x for f in sorted(RESULTS.rglob("*")) if f.suffix in (".json", ".md") for x in recorded(f)]
    missing = []
    for paragraph in paragraphs(section(text, "Measured so far")) + paragraphs(section(text, "Two commands")):
        cited = [ROOT / c.rstrip(".") for c in CITED.findall(paragraph)]
        assert all(c.is_file() for c in cited), [c for c in cited if not c.is_file()]
        values = [x for c in cited for x in recorded(c)]
        clean = IGNORED.sub(" ", CITED.sub(" ", paragraph))
        for figure, gib in DECIMAL.findall(clean):
            scale = [1.0, 2.0**10, 2.0**30] if gib else [1.0]  # recorded as GiB, MiB or bytes
            if not any(matches(figure, [v / k for v in pool]) for k in scale for pool in (values, everything)):
                missing.append((figure + gib, paragraph[:60]))
    assert not missing, f"README figures found in no recorded result they cite: {missing}"


def test_main_job_time_is_the_latest_recorded() -> None:
    text = " ".join((ROOT / "README.md").read_text().split())
    printed = json.loads((RESULTS / "main_job.json").read_text())["wall_clock"]  # "5 min 45 s"
    assert re.fullmatch(r"\d+ min \d+ s", printed), printed
    assert printed in section(text, "Two commands"), f"the main job took {printed} in main_job.json"


def test_the_checker_fails_on_a_figure_not_recorded() -> None:
    """The check can fail: a figure one digit off is not matched, the recorded one is."""
    values = recorded(RESULTS / "main_job.json")
    ppl = next(m["perplexity"]["perplexity"] for m in json.loads((RESULTS / "main_job.json").read_text())[
        "benchmark"]["models"] if m["label"] == "pruned")
    assert matches(f"{ppl:.2f}", values) and not matches(f"{ppl + 0.05:.2f}", values)
