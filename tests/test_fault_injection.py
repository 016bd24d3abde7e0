"""kill -9 at several points of `prune --checkpoint`, `onnx`, `pack` and `run`, then the same command again.

Each command runs as the CLI does (``surgeon_export.cli.main`` with its arguments) in a forked child
process, a real OS process that receives SIGKILL: no handler, no ``finally`` runs. Forking from the
test process (torch already imported) keeps a run of a tiny model at about a second instead of the
~10 s of CPU a fresh interpreter spends importing torch and transformers. Kill points: at fixed
fractions of the uninterrupted run's measured duration, and when a file of interest appears (a
shot finished, a temporary output directory created). After every kill the target is either absent
or complete; the final run must give bit-identical files to an uninterrupted one and leave no
temporary behind.

The stale-temporary checks (``assert_no_stale_temps``) rely on the next run removing what a killed
run left (``.NAME.tmp-*`` siblings): that cleaning is the `badinput` branch's work.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from surgeon_export import api
from tests.test_semi_structured import pruned_24_dir

Trigger = Callable[[float], bool]  # seconds since start -> kill now?


def _child(args: list[str]) -> None:
    sys.argv = ["surgeon-export", *args]
    from surgeon_export.cli import main

    try:
        main()
    except SystemExit as exc:
        os._exit(exc.code if isinstance(exc.code, int) else 1)
    os._exit(0)


def run(args: list[str], trigger: Trigger | None = None, timeout: float = 240.0) -> tuple[str, float]:
    """Run the CLI with ``args`` in a forked process; SIGKILL it when ``trigger`` fires.

    Returns ``("killed" | "exit N", seconds)``.
    """
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(args,))
    start = time.perf_counter()
    proc.start()
    while proc.is_alive():
        elapsed = time.perf_counter() - start
        if trigger is not None and trigger(elapsed):
            os.kill(proc.pid, signal.SIGKILL)
            proc.join()
            return "killed", elapsed
        if elapsed > timeout:
            os.kill(proc.pid, signal.SIGKILL)
            pytest.fail(f"{args[0]} hung for {timeout:.0f} s")
        time.sleep(0.005)
    proc.join()
    return f"exit {proc.exitcode}", time.perf_counter() - start


def after(seconds: float) -> Trigger:
    return lambda elapsed: elapsed >= seconds


def appears(pattern: Path) -> Trigger:
    """Fires once something matching ``pattern`` (a glob in its parent) exists."""
    return lambda _: pattern.parent.is_dir() and any(pattern.parent.glob(pattern.name))


def shots_done(checkpoint: Path, n: int) -> Trigger:
    def fire(_: float) -> bool:
        try:
            return json.loads((checkpoint / "progress.json").read_text())["shots_done"] >= n
        except (OSError, ValueError, KeyError):
            return False
    return fire


def files(directory: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Every file's bytes; of the model card only that it is there with its metadata block (it names the
    command, whose --out differs between the reference and the rerun)."""
    return {p.name: p.read_bytes()[:4] if p.name == "README.md" else p.read_bytes()
            for p in sorted(directory.iterdir()) if p.is_file() and p.name not in skip}


def assert_absent_or_complete(target: Path, reference: dict[str, bytes], skip: tuple[str, ...]) -> None:
    """Nothing half-written: a killed run left no target, or the whole one an uninterrupted run writes."""
    if target.exists():
        assert files(target, skip) == reference, f"{target} is half-written"


def assert_no_stale_temps(*targets: Path) -> None:
    """(Depends on the `badinput` branch: the next run removes temporaries a killed run left.)"""
    for target in targets:
        stale = sorted(p.name for p in target.parent.glob(f".{target.name}.*"))
        assert stale == [], f"stale temporaries beside {target}: {stale}"


def kill_and_rerun(args: list[str], triggers: list[Trigger], check: Callable[[], None]) -> list[str]:
    """Kill a run at each trigger in turn (checking the target after each), then run to completion."""
    outcomes = []
    for trigger in triggers:
        outcome, _ = run(args, trigger)
        outcomes.append(outcome)
        assert outcome in ("killed", "exit 0"), outcome
        check()
    final, _ = run(args)
    assert final == "exit 0", final
    return outcomes


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


PRUNE_SKIP = ("surgeon_report.json",)  # timings
ONNX_SKIP = ("surgeon_onnx.json", "surgeon_report.json")  # export seconds; the source's report, copied


def test_prune_checkpoint_killed_at_every_stage(tiny_llama_dir: Path, text_file: Path, tmp_path: Path) -> None:
    def args(ckpt: Path, out: Path) -> list[str]:
        return ["prune", str(tiny_llama_dir), "--method", "surgeon", "--sparsity", "0.5", "--shots", "3",
                "--calib-samples", "4", "--seq-len", "16", "--calib-text", str(text_file), "--checkpoint", str(ckpt),
                "--out", str(out), "--no-eval", "--no-streaming", "--threads", "1", "--quiet", "--force"]

    outcome, seconds = run(args(tmp_path / "ref-ckpt", tmp_path / "ref"))
    assert outcome == "exit 0"
    reference = files(tmp_path / "ref", PRUNE_SKIP)
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    triggers = [after(0.2 * seconds), shots_done(ckpt, 1), after(0.5 * seconds), shots_done(ckpt, 2),
                appears(out.parent / f".{out.name}.tmp-*"), after(0.8 * seconds)]
    outcomes = kill_and_rerun(args(ckpt, out), triggers, lambda: assert_absent_or_complete(out, reference, PRUNE_SKIP))
    assert outcomes.count("killed") >= 4, outcomes
    assert files(out, PRUNE_SKIP) == reference  # bit-identical weights, config, tokenizer
    assert sorted(p.name for p in ckpt.iterdir()) == ["progress.json", "state-3.safetensors"]
    assert_no_stale_temps(out)


def test_onnx_killed_then_rerun(tiny_llama_dir: Path, tmp_path: Path) -> None:
    def args(out: Path) -> list[str]:
        return ["onnx", str(tiny_llama_dir), "--out", str(out), "--threads", "1", "--quiet", "--force"]

    outcome, seconds = run(args(tmp_path / "ref"))
    assert outcome == "exit 0"
    reference = files(tmp_path / "ref", ONNX_SKIP)
    out = tmp_path / "out"
    triggers = [after(0.2 * seconds), appears(out.parent / f".{out.name}.tmp-*"), after(0.5 * seconds),
                after(0.8 * seconds)]
    outcomes = kill_and_rerun(args(out), triggers, lambda: assert_absent_or_complete(out, reference, ONNX_SKIP))
    assert outcomes.count("killed") >= 3, outcomes
    assert files(out, ONNX_SKIP) == reference
    assert_no_stale_temps(out)


def test_pack_killed_then_rerun(tmp_path: Path) -> None:
    _, source = pruned_24_dir(tmp_path)

    def args(out: Path) -> list[str]:
        return ["pack", str(source), "--out", str(out), "--format", "2:4", "--quiet", "--force"]

    outcome, seconds = run(args(tmp_path / "ref"))
    assert outcome == "exit 0"
    reference = files(tmp_path / "ref")
    out = tmp_path / "out"
    triggers = [after(0.2 * seconds), appears(out.parent / f".{out.name}.tmp-*"), after(0.5 * seconds),
                after(0.8 * seconds)]
    outcomes = kill_and_rerun(args(out), triggers, lambda: assert_absent_or_complete(out, reference, ()))
    assert outcomes.count("killed") >= 3, outcomes
    assert files(out) == reference  # weights, manifest with checksums, config, tokenizer
    api.densify(out, tmp_path / "dense")  # and it reads back, checksums verified
    assert_no_stale_temps(out)


def test_main_job_killed_then_rerun(tiny_llama_dir: Path, text_file: Path, tmp_path: Path) -> None:
    """`run` (--no-onnx: the benchmark's workers are fresh interpreters, and `onnx` has its own test above)."""
    start = time.perf_counter()  # the uninterrupted job's model steps, in this process (no benchmark)
    lm = api.load(tiny_llama_dir)
    calib = api.calibrate(lm, 4, seq_len=16, text=text_file)
    config = api.build_config("surgeon", structured=0.8, shots=2, allocation="uniform")
    api.save(lm, tmp_path / "ref" / "pruned", api.prune(lm, config, calibration=calib), align=api.RunConfig().align)
    seconds = time.perf_counter() - start
    ref_pruned = files(tmp_path / "ref" / "pruned", PRUNE_SKIP)

    out = tmp_path / "job"
    args = ["run", str(tiny_llama_dir), "--out", str(out), "--structured", "0.8", "--shots", "2",
            "--calib-samples", "4", "--seq-len", "16", "--ppl-windows", "2", "--text", str(text_file), "--no-onnx",
            "--no-runtimes", "--threads", "1", "--quiet", "--force"]
    triggers = [after(0.3 * seconds), after(0.7 * seconds), appears(out / ".pruned.tmp-*"), appears(out / "pruned")]
    outcomes = kill_and_rerun(args, triggers, lambda: assert_absent_or_complete(out / "pruned", ref_pruned, PRUNE_SKIP))
    assert outcomes.count("killed") >= 3, outcomes
    assert files(out / "pruned", PRUNE_SKIP) == ref_pruned
    bench = json.loads((out / "benchmark.json").read_text())
    assert [m["label"] for m in bench["models"]] == ["dense", "pruned"]
    assert_no_stale_temps(out / "pruned", out / "benchmark.json")
