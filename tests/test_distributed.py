"""Data-parallel pruning (torchrun, gloo): 2 ranks give one process's result, fail together, refuse bad starts.

Every multi-rank test spawns real processes (tests/dist_worker.py, or torchrun itself) on the tiny
model, with the environment torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR, a free MASTER_PORT).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from base import distributed as dist
from base.errors import SurgeonError
from base.formats import REPORT_FILE
from base.loading import load_model
from surgeon.sds import SDSConfig
from surgeon_export import api
from tests.conftest import CORPUS, make_tiny_llama
from tests.test_streaming import tensors

ROOT = Path(__file__).resolve().parents[1]
TEXT = {"calib_samples": 32, "seq_len": 16}  # 4 batches of 8: 2 per rank, added in another order
SURGEON = {"calib_samples": 16, "seq_len": 16}  # K-FAC: 4 batches of 4, 2 per rank
CASES = [  # name, build_config arguments, calibration
    ("magnitude", {"method": "magnitude", "sparsity": 0.5}, TEXT),
    ("wanda", {"method": "wanda", "sparsity": 0.5}, TEXT),
    ("sparsegpt", {"method": "sparsegpt", "sparsity": 0.5}, TEXT),
    ("sparsegpt-2:4", {"method": "sparsegpt", "pattern": "2:4"}, TEXT),
    ("sparsegpt-sds", {"method": "sparsegpt", "pattern": "2:4", "refine": {"epochs": 3, "adjust_epochs": 3}}, TEXT),
    ("wanda-sds-dense", {"method": "wanda", "sparsity": 0.5,
                         "refine": {"epochs": 3, "adjust_epochs": 3, "teacher": "dense"}}, TEXT),
    ("surgeon", {"method": "surgeon", "sparsity": 0.5, "shots": 2}, SURGEON),
    ("surgeon-2:4", {"method": "surgeon", "pattern": "2:4", "shots": 2}, SURGEON),
    ("surgeon-structured", {"method": "surgeon", "structured": 0.7, "shots": 2}, SURGEON),
    ("surgeon-uniform", {"method": "surgeon", "sparsity": 0.4, "shots": 1, "allocation": "uniform"}, SURGEON),
    ("wanda-structured", {"method": "wanda", "structured": 0.8}, SURGEON),
    ("surgeon-structured-2:4", {"method": "surgeon", "structured": 0.8, "pattern": "2:4", "shots": 1}, SURGEON),
    ("surgeon-true-fisher", {"method": "surgeon", "sparsity": 0.5, "shots": 1, "fisher": "true"}, SURGEON),
    ("surgeon-sds", {"method": "surgeon", "pattern": "2:4", "shots": 1, "refine": {"epochs": 3, "adjust_epochs": 3}},
     SURGEON),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int, **extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)  # this checkout's code
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **extra}


def spawn(args: list[str], world: int = 2, deadline: float = 240.0, linger: float | None = None,
          **extra: str) -> list[tuple[int | None, str, str]]:
    """Run ``world`` ranks of ``python -m tests.dist_worker ARGS``; (exit code, stdout, stderr) per rank.

    A rank still running at ``deadline`` seconds, or ``linger`` seconds after rank 0 ended, is killed
    (its exit code is then None)."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "tests.dist_worker", *args], cwd=ROOT, text=True,
                              env=rank_env(r, world, port, **extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for r in range(world)]
    start, main_done = time.monotonic(), None
    try:
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if main_done is None and procs[0].poll() is not None:
                main_done = now
            if now - start > deadline or (linger is not None and main_done is not None and now - main_done > linger):
                break
            time.sleep(0.1)
    finally:
        killed = [p for p in procs if p.poll() is None]
        for p in killed:
            p.kill()
    outs = [p.communicate() for p in procs]
    return [(None if p in killed else p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny model's directory and a small calibration text (tokenizing it is instant)."""
    root = tmp_path_factory.mktemp("dist")
    model, tokenizer = make_tiny_llama()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "text.txt").write_text(CORPUS * 40)
    return root / "model", root / "text.txt"


def one_process(model: Path, text: Path, config: dict, calib: dict, checkpoint: Path | None = None) -> tuple:
    kwargs = dict(config)
    if "refine" in kwargs:
        kwargs["refine"] = SDSConfig(**kwargs["refine"])
    lm = load_model(model)
    report = api.prune(lm, api.build_config(kwargs.pop("method"), **kwargs), calib_text=text, checkpoint=checkpoint,
                       **calib)
    return {f"{n}.weight": m.weight.data for n, m in lm.adapter.decoder_linears(lm.model).items()}, report.to_dict()


def test_every_method_on_two_ranks_equals_one_process(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    model, text = tiny
    cases = [{"name": n, "config": c, **calib} for n, c, calib in CASES]
    cases += [  # LLM Surgeon's checkpoint: rank 0 writes it; a rerun resumes from it on every rank
        {"name": "checkpoint", "config": CASES[6][1], **SURGEON, "checkpoint": str(tmp_path / "ckpt")},
        {"name": "resumed", "config": CASES[6][1], **SURGEON, "checkpoint": str(tmp_path / "ckpt")},
        {"name": "mismatch", "config": {"method": "wanda"}, "by_rank": {"sparsity": [0.5, 0.6]}, **TEXT},
        {"name": "too-few-windows", "config": {"method": "sparsegpt", "sparsity": 0.5}, "calib_samples": 1,
         "seq_len": 16},
        {"name": "too-few-kfac-windows", "config": {"method": "surgeon", "sparsity": 0.5, "kfac_samples": 1},
         "calib_samples": 4, "seq_len": 16},
    ]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"model": str(model), "calib_text": str(text), "timeout": 60, "cases": cases}))
    (tmp_path / "out").mkdir()
    ranks = spawn(["cases", str(spec), str(tmp_path / "out")])
    assert [r[0] for r in ranks] == [0, 0], ranks[0][2][-3000:] + ranks[1][2][-3000:]
    results = [json.loads((tmp_path / "out" / f"rank-{r}.json").read_text()) for r in range(2)]
    for name, config, calib in CASES + [("checkpoint", CASES[6][1], SURGEON), ("resumed", CASES[6][1], SURGEON)]:
        r0, r1 = results[0][name], results[1][name]
        assert "error" not in r0 and "error" not in r1, (name, r0.get("error"), r1.get("error"))
        assert r0["digest"] == r1["digest"], name  # every rank ends with bit-identical weights
        ours = load_file(str(tmp_path / "out" / f"{name}.safetensors"))
        ref, ref_report = one_process(model, text, config, calib)
        for key, W in ref.items():
            assert torch.equal(ours[key] == 0, W == 0), (name, key)  # the same masks
            torch.testing.assert_close(ours[key], W, rtol=1e-5, atol=1e-6, msg=f"{name} {key}")
        assert r0["report"]["layers"] == ref_report["layers"], name  # zeros counted per linear
        assert r0["report"].get("removal") == ref_report.get("removal"), name  # structured: the same groups
        assert r0["report"]["distributed"]["world_size"] == 2
        assert all(rank["collectives"] > 0 and rank["peak_rss_mib"] > 0 for rank in r0["report"]["distributed"]["ranks"])
    assert (tmp_path / "ckpt" / "progress.json").is_file()  # written once, by rank 0
    assert results[0]["resumed"]["report"]["shots"] == results[0]["checkpoint"]["report"]["shots"]
    for r in results:  # the same one-line error on every rank, naming what differs / both numbers
        assert r["mismatch"]["error"] == ("the 2 ranks were not started alike (rank 1 differs from rank 0 in pruning "
                                          "config): start every rank with the same command, model and data")
        assert r["too-few-windows"]["error"].startswith("1 calibration windows cannot be shared by 2 ranks")
        assert r["too-few-kfac-windows"]["error"].startswith("1 K-FAC windows cannot be shared by 2 ranks")


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
    ref = api.prune_streamed(model, api.build_config("sparsegpt", pattern="2:4"), tmp_path / "ref", calib_samples=16,
                             seq_len=16, calib_text=text)
    a, b = tensors(out), tensors(tmp_path / "ref")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key] == 0, b[key] == 0), key
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    written = json.loads((out / REPORT_FILE).read_text())
    assert written["layers"] == ref["layers"] and written["saved_sparsity"] == ref["saved_sparsity"]
    assert written["distributed"]["world_size"] == 2


@pytest.mark.parametrize("fault, message", [
    ("kill", "error: rank 0 of 2: rank 1 of 2 stopped ("),
    ("stall", "error: rank 0 of 2: a collective (all-reduce) timed out after 5 s"),
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


def test_assign_and_shards_without_a_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    assert dist.assign({"a": 1.0, "b": 5.0}) == {"a": 0, "b": 0}  # one process: everything is rank 0's
    assert dist.shard_bounds(7, 4) == (0, 7)
    monkeypatch.setattr(dist, "world_size", lambda: 3)
    costs = {"q": 4.0, "k": 2.0, "v": 2.0, "o": 4.0, "down": 9.0, "gate": 3.0}
    owners = dist.assign(costs)
    assert owners == {"q": 1, "k": 2, "v": 2, "o": 2, "down": 0, "gate": 1}  # largest first, to the least loaded
    assert [sum(c for n, c in costs.items() if owners[n] == r) for r in range(3)] == [9.0, 7.0, 8.0]
    for n, batch in ((64, 8), (20, 8), (5, 8), (3, 1)):
        shards = []
        for r in range(3):
            monkeypatch.setattr(dist, "rank", lambda r=r: r)
            shards.append(dist.shard_bounds(n, batch))
        assert shards[0][0] == 0 and shards[-1][1] == n and all(a[1] == b[0] for a, b in zip(shards, shards[1:]))
        assert all(lo < hi for lo, hi in shards)  # every rank has windows
        if -(-n // batch) >= 3:  # enough batches: cut at batch boundaries, as one process batches them
            assert all(lo % batch == 0 for lo, _ in shards)
    with pytest.raises(SurgeonError, match="^2 calibration windows cannot be shared by 3 ranks"):
        dist.shard_bounds(2, 8)


def test_other_commands_refuse_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    from surgeon_export import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SurgeonError, match="only `prune` runs data-parallel under torchrun"):
        cli._setup(False, None)
