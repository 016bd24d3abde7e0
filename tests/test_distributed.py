"""Data-parallel pruning (torchrun, gloo): 1, 2 and 3 ranks give the same bits, fail together, refuse bad starts.

Every multi-rank test spawns real processes (tests/dist_worker.py, or torchrun itself) on the tiny
models (tests/families.py), with the environment torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR, a free
MASTER_PORT), one thread each.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from base import distributed as dist
from base.errors import SurgeonError
from base.formats import REPORT_FILE
from surgeon_export import api
from tests.conftest import CORPUS
from tests.dist_worker import run_cases
from tests.families import save_family
from tests.test_streaming import tensors

ROOT = Path(__file__).resolve().parents[1]
# Window counts that no rank count divides: 7 windows in batches of 2 (4 batches: 2 + 2 on 2 ranks,
# 2 + 1 + 1 on 3), 5 in batches of 2 (3 batches: 2 + 1, then one each).
TEXT = {"calib_samples": 7, "seq_len": 16}
SURGEON = {"calib_samples": 5, "seq_len": 16}
DRIVER = {"calib_batch": 2}
KFAC = {"kfac_batch": 2}
SDS = {"epochs": 3, "adjust_epochs": 3}
CASES = [  # name, build_config arguments, calibration
    ("magnitude", {"method": "magnitude", "sparsity": 0.5}, TEXT),
    ("wanda", {"method": "wanda", "sparsity": 0.5, **DRIVER}, TEXT),
    ("sparsegpt", {"method": "sparsegpt", "sparsity": 0.5, **DRIVER}, TEXT),
    ("sparsegpt-2:4", {"method": "sparsegpt", "pattern": "2:4", **DRIVER}, TEXT),
    ("sparsegpt-one-batch", {"method": "sparsegpt", "pattern": "2:4"}, SURGEON),  # 5 windows, one batch of 8
    ("sparsegpt-sds", {"method": "sparsegpt", "pattern": "2:4", "refine": SDS, **DRIVER}, TEXT),
    ("wanda-sds-dense", {"method": "wanda", "sparsity": 0.5, "refine": {**SDS, "teacher": "dense"}, **DRIVER}, TEXT),
    ("surgeon", {"method": "surgeon", "sparsity": 0.5, "shots": 2, **KFAC}, SURGEON),
    ("surgeon-2:4", {"method": "surgeon", "pattern": "2:4", "shots": 2, **KFAC}, SURGEON),
    ("surgeon-structured", {"method": "surgeon", "structured": 0.7, "shots": 2, **KFAC}, SURGEON),
    ("surgeon-uniform", {"method": "surgeon", "sparsity": 0.4, "shots": 1, "allocation": "uniform", **KFAC}, SURGEON),
    ("surgeon-kfac-split", {"method": "surgeon", "sparsity": 0.5, "shots": 1, "kfac_samples": 3, **KFAC}, SURGEON),
    ("wanda-structured", {"method": "wanda", "structured": 0.8, **KFAC}, SURGEON),
    ("surgeon-structured-2:4", {"method": "surgeon", "structured": 0.8, "pattern": "2:4", "shots": 1, **KFAC}, SURGEON),
    ("surgeon-true-fisher", {"method": "surgeon", "sparsity": 0.5, "shots": 1, "fisher": "true", **KFAC}, SURGEON),
    ("surgeon-sds", {"method": "surgeon", "pattern": "2:4", "shots": 1, "refine": SDS, **KFAC}, SURGEON),
]
# Float32 terms whose float64 sum depends on the order of the additions: added one batch at a time,
# 2^60 + 1 + 1 - 2^60 + 1 + 3 + 0.5 is 4.5 (each 1 is lost against 2^60); exactly, it is 6.5.
ORDER_TERMS = [[2.0**60, 1.0, 1.0, -(2.0**60), 1.0, 3.0, 0.5][k:] + [2.0**60, 1.0, 1.0, -(2.0**60), 1.0, 3.0, 0.5][:k]
               for k in range(5)]  # [5 rows, 7 batches]: each row the sequence rotated


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int, **extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)  # this checkout's code
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **extra}


def start(args: list[str], world: int = 2, **extra: str) -> list[tuple[subprocess.Popen, Any, Any]]:
    """Start ``world`` ranks of ``python -m tests.dist_worker ARGS`` (their output goes to temporary files)."""
    port = free_port()
    ranks = []
    for r in range(world):
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        ranks.append((subprocess.Popen([sys.executable, "-m", "tests.dist_worker", *args], cwd=ROOT, text=True,
                                       env=rank_env(r, world, port, **extra), stdout=out, stderr=err), out, err))
    return ranks


def finish(ranks: list[tuple[subprocess.Popen, Any, Any]], deadline: float = 240.0,
           linger: float | None = None) -> list[tuple[int | None, str, str]]:
    """(exit code, stdout, stderr) of each rank :func:`start` started. A rank still running ``deadline`` seconds
    after this call, or ``linger`` seconds after rank 0 ended, is killed (its exit code is then None)."""
    procs = [p for p, _, _ in ranks]
    begin, main_done = time.monotonic(), None
    try:
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if main_done is None and procs[0].poll() is not None:
                main_done = now
            if now - begin > deadline or (linger is not None and main_done is not None and now - main_done > linger):
                break
            time.sleep(0.1)
    finally:
        killed = [p for p in procs if p.poll() is None]
        for p in killed:
            p.kill()
    done = []
    for p, out, err in ranks:
        p.wait()
        texts = []
        for f in (out, err):
            f.seek(0)
            texts.append(f.read())
            f.close()
        done.append((None if p in killed else p.returncode, *texts))
    return done


def spawn(args: list[str], world: int = 2, deadline: float = 240.0, linger: float | None = None,
          **extra: str) -> list[tuple[int | None, str, str]]:
    """Run ``world`` ranks of ``python -m tests.dist_worker ARGS`` to the end (:func:`start`, :func:`finish`)."""
    return finish(start(args, world, **extra), deadline, linger)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny Llama's directory and a small calibration text (tokenizing it is instant)."""
    root = tmp_path_factory.mktemp("dist")
    save_family("llama", root / "model")
    (root / "text.txt").write_text(CORPUS * 40)
    return root / "model", root / "text.txt"


def untimed(record: Any) -> Any:
    """A report's record without its timings (SDS's seconds per linear and per layer)."""
    if isinstance(record, dict):
        return {k: untimed(v) for k, v in record.items() if not k.startswith("seconds")}
    return record


def left_fold(row: list[float]) -> float:
    total = 0.0
    for x in row:
        total += x  # float64, one term after another
    return total


def test_every_method_gives_the_same_bits_on_1_2_and_3_ranks(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """Each method on 7 or 5 windows, in batches that no rank count divides evenly (and one batch of 8 for
    5 windows: the other ranks wait): every rank of every run ends with the same bits, and the reports agree."""
    model, text = tiny
    gemma = save_family("gemma3_text", tmp_path / "gemma")  # per-layer kwargs (sliding and full attention), BOS first
    cases = [{"name": n, "config": c, **calib} for n, c, calib in CASES]
    cases += [{"name": "gemma3-sparsegpt", "model": str(gemma), "config": {"method": "sparsegpt", "pattern": "2:4",
                                                                          **DRIVER}, **TEXT},
              {"name": "ordered-sum", "terms": [list(col) for col in zip(*ORDER_TERMS)]}]
    worlds = (1, 2, 3)
    groups = {}
    for world in worlds:
        out = tmp_path / f"w{world}"
        out.mkdir()
        extra = [  # LLM Surgeon's checkpoint: rank 0 writes it; a rerun resumes from it on every rank
            {"name": "checkpoint", "config": CASES[7][1], **SURGEON, "checkpoint": str(out / "ckpt")},
            {"name": "resumed", "config": CASES[7][1], **SURGEON, "checkpoint": str(out / "ckpt")},
        ]
        if world == 2:
            extra.append({"name": "mismatch", "config": {"method": "wanda"}, "by_rank": {"sparsity": [0.5, 0.6]}, **TEXT})
        spec = out / "spec.json"
        spec.write_text(json.dumps({"model": str(model), "calib_text": str(text), "timeout": 120, "cases": cases + extra}))
        if world > 1:
            groups[world] = start(["cases", str(spec), str(out)], world)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one process, here, while the ranks run: one thread, as each rank
    try:
        run_cases(tmp_path / "w1" / "spec.json", tmp_path / "w1")
    finally:
        torch.set_num_threads(threads)
    for world, group in groups.items():
        ranks = finish(group, deadline=400)
        assert [r[0] for r in ranks] == [0] * world, "".join(r[2][-3000:] for r in ranks)
    results = {world: [json.loads((tmp_path / f"w{world}" / f"rank-{r}.json").read_text()) for r in range(world)]
               for world in worlds}
    reference = results[1][0]
    for name in [n for n, _, _ in CASES] + ["gemma3-sparsegpt", "checkpoint", "resumed"]:
        ref = reference[name]
        assert "error" not in ref and ref["report"]["sparsity"] > 0.2, (name, ref.get("error"))
        for world in worlds[1:]:
            for r, result in enumerate(results[world]):
                ours = result[name]
                assert "error" not in ours, (name, world, r, ours.get("error"))
                assert ours["digest"] == ref["digest"], (name, world, r)  # bit-identical weights (and everything else)
                for key in ("layers", "removal", "refine", "sparsity"):
                    assert untimed(ours["report"].get(key)) == untimed(ref["report"].get(key)), (name, world, key)
                assert ours["report"]["distributed"]["world_size"] == world
                assert all(rank["collectives"] > 0 for rank in ours["report"]["distributed"]["ranks"])
    for world in worlds:
        assert (tmp_path / f"w{world}" / "ckpt" / "progress.json").is_file()  # written once, by rank 0
        assert results[world][0]["resumed"]["report"]["shots"] == results[world][0]["checkpoint"]["report"]["shots"]
        for result in results[world]:  # the batches' order, whatever the ranks: 4.5, where the exact sum is 6.5
            assert result["ordered-sum"] == {"sum": [left_fold(row) for row in ORDER_TERMS], "count": 7}
    assert left_fold(ORDER_TERMS[0]) == 4.5
    for r in results[2]:  # the same one-line error on every rank, naming what differs
        assert r["mismatch"]["error"] == ("the 2 ranks were not started alike (rank 1 differs from rank 0 in pruning "
                                          "config): start every rank with the same command, model and data")


# Streamed LLM Surgeon (and the structured baselines its walk runs): every target, allocation and group cost,
# A from more windows than G with a ragged last K-FAC batch, the true Fisher; 5 windows in batches of 2
# (and of 4).
STREAMED = [
    ("unstructured", {"method": "surgeon", "sparsity": 0.5, "shots": 2, **KFAC}),
    ("unstructured-uniform", {"method": "surgeon", "sparsity": 0.5, "shots": 1, "allocation": "uniform", **KFAC}),
    ("2:4-kfac-split", {"method": "surgeon", "pattern": "2:4", "shots": 2, "kfac_samples": 3, **KFAC}),
    ("structured", {"method": "surgeon", "structured": 0.7, "shots": 2, **KFAC}),
    ("structured-sum", {"method": "surgeon", "structured": 0.7, "shots": 1, "group_cost": "sum", **KFAC}),
    ("structured-uniform", {"method": "surgeon", "structured": 0.7, "shots": 1, "allocation": "uniform", **KFAC}),
    ("structured-then-2:4", {"method": "surgeon", "structured": 0.8, "pattern": "2:4", "shots": 1, **KFAC}),
    ("true-fisher", {"method": "surgeon", "sparsity": 0.4, "shots": 1, "fisher": "true", **KFAC}),
    ("wanda-structured", {"method": "wanda", "structured": 0.8, **KFAC}),
    ("magnitude-structured", {"method": "magnitude", "structured": 0.8}),
    # batches of 4: 2 batches, so the third rank has none in any walk (and wanda's A on 3 ranks likewise)
    ("one-batch-each", {"method": "surgeon", "structured": 0.7, "shots": 1}),
    ("wanda-structured-idle-rank", {"method": "wanda", "structured": 0.8}),
]


def streamed_spec(model: Path, text: Path, out: Path, cases: list[tuple[str, dict]]) -> Path:
    spec = out / "spec.json"
    spec.write_text(json.dumps({"model": str(model), "calib_text": str(text), "timeout": 120, "cases": [
        {"name": n, "config": c, **SURGEON, "out": str(out / n)} for n, c in cases]}))
    return spec


def one_process(spec: Path, out: Path) -> dict:
    """The cases of ``spec`` run here, in one process with one thread (as each rank)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_cases(spec, out)
    finally:
        torch.set_num_threads(threads)
    return json.loads((out / "rank-0.json").read_text())


def test_streamed_surgeon_gives_the_same_bits_on_1_2_and_3_ranks(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """Streamed LLM Surgeon under torchrun: the walks' batches split between the ranks, each layer's work by
    cost; rank 0 writes what one process writes, bit for bit, and every rank reports the same."""
    model, text = tiny
    specs, groups = {}, {}
    for world in (1, 2, 3):
        (tmp_path / f"w{world}").mkdir()
        specs[world] = streamed_spec(model, text, tmp_path / f"w{world}", STREAMED)
        if world > 1:
            groups[world] = start(["cases", str(specs[world]), str(tmp_path / f"w{world}")], world)
    reference = one_process(specs[1], tmp_path / "w1")
    for world, group in groups.items():
        ranks = finish(group, deadline=400)
        assert [r[0] for r in ranks] == [0] * world, "".join(r[2][-3000:] for r in ranks)
    for name, _ in STREAMED:
        ref = reference[name]
        assert "error" not in ref and ref["report"]["sparsity"] > 0.1, (name, ref.get("error"))
        for world in (2, 3):
            for r in range(world):
                ours = json.loads((tmp_path / f"w{world}" / f"rank-{r}.json").read_text())[name]
                assert "error" not in ours, (name, world, r, ours["error"])
                if r == 0:
                    assert ours["digest"] == ref["digest"], (name, world)  # bit-identical checkpoints
                for key in ("layers", "removal", "sparsity"):
                    assert ours["report"].get(key) == ref["report"].get(key), (name, world, r, key)
                assert [s["sparsity"] for s in ours["report"]["shots"]] == [s["sparsity"] for s in ref["report"]["shots"]]
                assert ours["report"]["distributed"]["world_size"] == world
            assert not list((tmp_path / f"w{world}").glob(".*")), list((tmp_path / f"w{world}").iterdir())  # no spill


# Barriers of one 2-shot global structured run on the 3-layer model: 3 forward, 3 reverse, 3 update and the
# shot's end per shot, then two at the end; a kill right after a reverse, an update and a shot-end step and at the end
# (going back from a forward step is the same as from a reverse one).
KILL_AT = [4, 7, 10, 21]


def test_streamed_surgeon_resumes_on_every_rank_after_a_rank_died(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """Rank 1 killed right after a barrier (its state a step behind rank 0's, or rank 0's a step behind at
    the end of a shot): rank 0 stops with one line, nothing is written, and a rerun of both ranks resumes and
    writes the one-process result, bit for bit."""
    model, text = tiny
    case = [("structured", dict(STREAMED[3][1]))]
    (tmp_path / "ref").mkdir()
    reference = one_process(streamed_spec(model, text, tmp_path / "ref", case), tmp_path / "ref")["structured"]
    for at in KILL_AT:
        out = tmp_path / f"at-{at}"
        out.mkdir()
        spec = streamed_spec(model, text, out, case)
        ranks = spawn(["cases", str(spec), str(out)], deadline=200, TEST_FAULT="kill-sync", TEST_FAULT_AT=str(at))
        assert ranks[1][0] == -9, (at, ranks[1][2][-2000:])
        # rank 0's exit code is not asserted: gloo's teardown after a lost peer may abort (the CLI's own
        # exit is tested above); its result file must hold the one line
        error = json.loads((out / "rank-0.json").read_text())["structured"]["error"]
        assert error.startswith("rank 0 of 2: rank 1 of 2 stopped"), (at, error)
        assert not (out / "structured").exists()
        ranks = spawn(["cases", str(spec), str(out)], deadline=200)
        assert [r[0] for r in ranks] == [0, 0], (at, "".join(r[2][-3000:] for r in ranks))
        resumed = json.loads((out / "rank-0.json").read_text())["structured"]
        assert resumed.get("digest") == reference["digest"], (at, resumed.get("error"))
        assert resumed["report"]["removal"] == reference["report"]["removal"]
        assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [], at  # no spill left


def test_torchrun_streamed_prune_writes_once_the_one_process_result(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    model, text = tiny
    out = tmp_path / "out"
    args = ["--method", "sparsegpt", "--pattern", "2:4", "--calib-samples", "16", "--seq-len", "16",
            "--calib-text", str(text)]
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "surgeon_export",
         "prune", str(model), *args, "--streaming", "--out", str(out), "--no-eval", "--json", "--quiet", "--threads", "1",
         "--dist-timeout", "120"],
        cwd=tmp_path, env=rank_env(0, 1, 0), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads(done.stdout)  # rank 0 alone prints
    assert payload["streamed"] is True and payload["distributed"]["world_size"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial or temporary left
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: float32 products block by the thread count
    try:
        ref = api.prune_streamed(model, api.build_config("sparsegpt", pattern="2:4"), tmp_path / "ref",
                                 calib_samples=16, seq_len=16, calib_text=text)
    finally:
        torch.set_num_threads(threads)
    a, b = tensors(out), tensors(tmp_path / "ref")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit-identical
    written = json.loads((out / REPORT_FILE).read_text())
    assert written["layers"] == ref["layers"] and written["saved_sparsity"] == ref["saved_sparsity"]
    assert written["distributed"]["world_size"] == 2


@pytest.mark.parametrize("fault, message", [
    ("kill", "error: rank 0 of 2: rank 1 of 2 stopped ("),
    ("stall", "error: rank 0 of 2: a collective (all-gather) timed out after 5 s"),
])
def test_a_failed_rank_stops_the_others_and_nothing_is_written(tiny: tuple[Path, Path], tmp_path: Path, fault: str,
                                                                message: str) -> None:
    model, text = tiny
    out = tmp_path / "out"
    start = time.monotonic()
    ranks = spawn(["cli", "prune", str(model), "--method", "sparsegpt", "--sparsity", "0.5", "--calib-samples", "16",
                   "--seq-len", "16", "--calib-text", str(text), "--out", str(out), "--no-eval", "--quiet",
                   "--dist-timeout", "5"], deadline=120, linger=2, TEST_FAULT=fault)
    code, _, err = ranks[0]
    assert code == 2, err[-2000:]
    assert err.strip().splitlines()[-1].startswith(message), err[-2000:]
    assert "Traceback" not in err
    assert time.monotonic() - start < 90  # not hanging: the collective failed or timed out
    assert list(tmp_path.iterdir()) == []  # nothing at --out, no temporary beside it
    assert ranks[1][0] in (None, -9)  # the faulty rank was killed (by itself, or at the end of the test)


def test_under_torchrun_a_killed_rank_is_named_by_the_others(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """torchrun SIGTERMs the surviving ranks as soon as one dies (here while they are busy, outside any
    collective): each still prints our one line naming the dead rank and exits with 2; torchrun's own
    summary follows in the launcher's process."""
    model, text = tiny
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "tests.dist_worker",
         "cli", "prune", str(model), "--method", "sparsegpt", "--sparsity", "0.5", "--calib-samples", "16", "--seq-len",
         "16", "--calib-text", str(text), "--out", str(tmp_path / "out"), "--no-eval", "--quiet", "--dist-timeout", "60"],
        cwd=ROOT, env=rank_env(0, 1, 0, TEST_FAULT="kill-busy"), capture_output=True, text=True, timeout=300)
    err = done.stderr
    ours = [line for line in err.splitlines() if line.startswith("error: ")]
    assert ours == ["error: rank 0 of 2: rank 1 of 2 stopped, and the launcher stopped this rank; nothing was written"], err
    assert "exitcode  : 2 " in err.split("rank      : 0 (local_rank: 0)", 1)[1], err  # rank 0 ended with our code
    assert err.count("Traceback") == 1 and "ChildFailedError" in err, err  # torchrun's own, nothing of ours
    assert not (tmp_path / "out").exists()


def test_dead_ranks_are_found_by_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # ended and reaped: its pid is free
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    while dist._process_gone(zombie.pid) is False:  # ended, not yet reaped: a zombie counts as gone
        time.sleep(0.01)
    host = dist._host_digest()
    monkeypatch.setattr(dist, "_PEERS", [(host, os.getpid()), (host, gone.pid), (host + 1, gone.pid),
                                         (host, os.getppid()), (host, zombie.pid)])
    monkeypatch.setattr(dist, "world_size", lambda: 5)
    assert dist.dead_ranks() == [1, 4]  # rank 2 is on another host: not checkable from here
    failure = dist._failure(RuntimeError("[../gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer"),
                            "all-reduce")
    assert str(failure) == "rank 0 of 5: ranks 1, 4 of 5 stopped (Read error: Connection reset by peer); nothing was written"
    zombie.wait()
    monkeypatch.setattr(dist, "_REPORTED", [False])
    with pytest.raises(dist.DistributedError, match="^rank 0 of 5: ranks 1, 4 of 5 stopped, and the launcher stopped"):
        dist._terminated(15, None)
    with pytest.raises(SystemExit):  # once reported, a second SIGTERM just ends the process
        dist._terminated(15, None)


def test_assign_and_batches_without_a_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    assert dist.assign({"a": 1.0, "b": 5.0}) == {"a": 0, "b": 0}  # one process: everything is rank 0's
    assert dist.batches_of(7, 4) == [(0, 4), (4, 7)]
    monkeypatch.setattr(dist, "world_size", lambda: 3)
    costs = {"q": 4.0, "k": 2.0, "v": 2.0, "o": 4.0, "down": 9.0, "gate": 3.0}
    owners = dist.assign(costs)
    # largest first, to the least loaded rank, ties to the higher rank (rank 0 also writes): the heaviest is not 0's
    assert owners == {"q": 1, "k": 0, "v": 0, "o": 0, "down": 2, "gate": 1}
    assert [sum(c for n, c in costs.items() if owners[n] == r) for r in range(3)] == [8.0, 7.0, 9.0]
    shares = {}
    for r in range(3):
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        shares[r] = dist.batches_of(7, 2), dist.batches_of(5, 8)
    assert [shares[r][0] for r in range(3)] == [[(0, 2), (6, 7)], [(2, 4)], [(4, 6)]]  # one process's batches, dealt
    assert [shares[r][1] for r in range(3)] == [[(0, 5)], [], []]  # one batch: the other ranks have none
    assert [dist._row_bounds(5)[r] for r in range(3)] == [(0, 1), (1, 3), (3, 5)]  # the rows each rank adds
    with pytest.raises(ValueError, match="shape"):
        dist.OrderedSum([3]).add(torch.ones(4))


def test_other_commands_refuse_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    from surgeon_export import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SurgeonError, match="only `prune` runs data-parallel under torchrun"):
        cli._setup(False, None)


def test_streaming_benchmark_keeps_our_error_line_under_torchrun(tmp_path: Path) -> None:
    """benchmarks/streaming.py's prune runner records the product's one ``error:`` line, not torchrun's banner
    (the last line of a failed torchrun: the 7B run of session 18 was recorded as ``====...``)."""
    from benchmarks.streaming import run_prune

    r = run_prune(str(tmp_path / "missing"), tmp_path / "out", ["--method", "wanda", "--sparsity", "0.5"], 1, ranks=2)
    assert r["error"].startswith("error: ") and "missing" in r["error"], r
