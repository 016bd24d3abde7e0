"""Streamed LLM Surgeon (one decoder layer in memory) against whole-model LLM Surgeon: the same tensors,
masks, removed groups and shots; resume after an interruption anywhere; bad input."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import base.files
import base.resume
import surgeon.streamed_surgeon as streamed
from base.adapters import LLAMA
from base.env import PeakWindow, peak_rss_mib
from base.errors import SurgeonError
from base.lazy import open_lazy
from base.loading import load_model
from base.resume import ResumeState
from surgeon.calibrate import head_gradient, kfac_factors
from surgeon.prune.threshold import kth_smallest
from surgeon.sds import SDSConfig
from surgeon_export import api
from tests.cli_runner import run_cli
from tests.conftest import CORPUS, make_tiny_llama, tensors

PHASES = ("forward", "head", "reverse", "select", "update", "done")  # of a shot, in order (state.json)
CALIB: dict = dict(calib_samples=4, seq_len=16)  # calib_text: set by the src fixture (tokenizing WikiText-2 takes seconds)


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, tokenizer = make_tiny_llama(num_hidden_layers=3)
    path = tmp_path_factory.mktemp("streamed-surgeon") / "src"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path.parent / "calib.txt").write_text(CORPUS * 40)
    CALIB["calib_text"] = path.parent / "calib.txt"
    return path


def whole_model(src: Path, cfg: api.Config) -> tuple[dict[str, torch.Tensor], dict]:
    """Whole-model LLM Surgeon's pruned weights (masked, before any shrinking) and report."""
    lm = load_model(src)
    report = api.prune(lm, cfg, **CALIB)
    return lm.model.state_dict(), report.to_dict()


# Every target, allocation and scoring; A from more windows than G (with a ragged last K-FAC batch);
# the sampled (true) Fisher. The tiny model's layers are exercised in every phase of the walk.
CONFIGS = {
    "2:4, A from all windows": dict(pattern="2:4", shots=2, kfac_samples=3, kfac_batch=2),
    "unstructured global": dict(sparsity=0.5, shots=2),
    "unstructured uniform": dict(sparsity=0.5, shots=2, allocation="uniform"),
    "structured global": dict(structured=0.7, shots=2),
    "structured uniform, sum cost": dict(structured=0.7, shots=2, allocation="uniform", group_cost="sum"),
    "structured then 2:4": dict(structured=0.8, pattern="2:4", shots=2),
    "true Fisher": dict(sparsity=0.4, shots=1, fisher="true"),
}


@pytest.mark.parametrize("kwargs", CONFIGS.values(), ids=CONFIGS.keys())
def test_streamed_equals_whole_model(src: Path, tmp_path: Path, kwargs: dict) -> None:
    cfg = api.build_config("surgeon", **kwargs)
    reference, report = whole_model(src, cfg)
    written = api.prune_streamed(src, cfg, tmp_path / "out", **CALIB)
    saved = tensors(tmp_path / "out")
    assert saved.keys() == reference.keys() - {"lm_head.weight"}  # tied to the embeddings
    for key, value in saved.items():  # bit-identical: the same factors, costs, selection and updates
        assert torch.equal(value, reference[key]), key
    assert written["layers"] == report["layers"] and written.get("removal") == report.get("removal")
    assert [s["sparsity"] for s in written["shots"]] == [s["sparsity"] for s in report["shots"]]
    assert written["streamed"] is True and not list(tmp_path.glob(".out*"))
    if cfg.structured is not None and cfg.pattern is None:
        assert written["removal"]  # groups were removed, and the same ones


@pytest.mark.parametrize("method, allocation", [("wanda", "uniform"), ("magnitude", "global")])
def test_structured_baselines_stream_too(src: Path, tmp_path: Path, method: str, allocation: str) -> None:
    cfg = api.build_config(method, structured=0.7, allocation=allocation)
    reference, report = whole_model(src, cfg)
    written = api.prune_streamed(src, cfg, tmp_path / "out", **CALIB)
    assert all(torch.equal(v, reference[k]) for k, v in tensors(tmp_path / "out").items())
    assert written["removal"] == report["removal"] and written["removal"]


def test_kth_smallest_is_kthvalue_one_chunk_at_a_time() -> None:
    """The global threshold's radix selection gives torch's k-th value exactly (float32 order, negatives,
    ties, magnitudes 1e-8..1e8), reading the chunks twice and never concatenating them."""
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        chunks = [torch.randn(int(torch.randint(1, 300, (1,), generator=g)), generator=g, dtype=torch.float64)
                  * 10.0 ** int(torch.randint(-8, 8, (1,), generator=g)) for _ in range(4)]
        chunks[0][:3] = -1.0  # removed weights
        chunks[1] = chunks[1].round() if trial % 2 else chunks[1]  # many ties
        flat = torch.cat(chunks).float()
        for k in (1, flat.numel(), int(torch.randint(1, flat.numel() + 1, (1,), generator=g))):
            assert kth_smallest(lambda: iter(chunks), k) == float(flat.kthvalue(k).values), (trial, k)


def test_per_layer_peak_windows_keep_the_process_peak() -> None:
    """Opening a per-layer peak window resets the kernel's mark (which ``ru_maxrss`` reads too); the
    process's peak (the CLI's ``peak_rss_mib``) must still count what came before."""
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    before = peak_rss_mib()
    del big
    window = PeakWindow()
    assert peak_rss_mib() >= before >= window.peak_mib() - 1  # the window starts at the current size, not above


def test_chunked_head_gradient_matches_full_logits() -> None:
    """The LM head in token chunks gives the gradient of the full-vocabulary loss (float32, to rounding:
    the chunks' matrix products may sum in another order than one product over every token)."""
    model, _ = make_tiny_llama()
    ids = torch.randint(2, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    hidden = model.model(input_ids=ids).last_hidden_state.detach().requires_grad_()
    logits = model.lm_head(hidden)[:, :-1]
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                      reduction="sum").backward()
    V = model.config.vocab_size
    for chunk in (V, 5 * V, 10**9):  # one token, five, everything at once
        torch.testing.assert_close(head_gradient(model, hidden, ids, chunk=chunk), hidden.grad, rtol=1e-5, atol=1e-7)
    true1 = head_gradient(model, hidden, ids, fisher="true", gen=torch.Generator().manual_seed(3), chunk=5 * V)
    true2 = head_gradient(model, hidden, ids, fisher="true", gen=torch.Generator().manual_seed(3), chunk=5 * V)
    assert torch.equal(true1, true2) and not torch.allclose(true1, hidden.grad)


def test_kfac_factors_do_not_depend_on_the_head_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = make_tiny_llama(dtype=torch.float64)
    windows = torch.randint(2, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    whole = kfac_factors(model, LLAMA, windows)
    monkeypatch.setattr("surgeon.calibrate.HEAD_CHUNK", 3 * model.config.vocab_size)  # three tokens a chunk
    chunked = kfac_factors(model, LLAMA, windows)
    for name, f in whole.items():
        torch.testing.assert_close(chunked[name].G, f.G, rtol=1e-12, atol=1e-14)
        assert torch.equal(chunked[name].A, f.A)


class Killed(BaseException):
    """What a kill -9 leaves: nothing after the interrupted step runs (no except clause catches it)."""


@pytest.mark.parametrize("kwargs, kill_at", [
    # the k-th write of 62, before it lands (False) or just after (True): 3 forward, 9 head, 17 reverse,
    # 24 selection, 60 the second shot's last update
    (dict(sparsity=0.5, shots=2), [(3, False), (9, True), (17, False), (24, True), (60, True)]),
    (dict(structured=0.7, shots=2), [(15, True), (24, False)]),  # reverse (candidates), selection
    (dict(pattern="2:4", shots=2, kfac_samples=3, kfac_batch=2), [(5, False), (15, True)]),  # A of all windows; local update
], ids=["unstructured global", "structured global", "2:4 split"])
def test_interrupted_anywhere_resumes_bit_identical(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    kwargs: dict, kill_at: list[tuple[int, bool]]) -> None:
    """Interrupt the k-th write of the walk (before it lands, or just after it), rerun the same
    command: the run goes on from its state (fewer layer steps than a whole run) and ends with the
    uninterrupted run's tensors."""
    cfg = api.build_config("surgeon", **kwargs)
    steps = {"n": 0}
    real_done = streamed._Walk._layer_done
    monkeypatch.setattr(streamed._Walk, "_layer_done",
                        lambda self, i, s: steps.__setitem__("n", steps["n"] + 1) or real_done(self, i, s))
    api.prune_streamed(src, cfg, tmp_path / "once", **CALIB)
    once, whole_run = tensors(tmp_path / "once"), steps["n"]
    real = ResumeState._write
    for k, after in kill_at:
        writes = {"n": 0}

        def write(self: ResumeState, name: str, fill: object) -> None:
            if self.directory.name != "surgeon":  # the checkpoint's own progress, not the walk's spill
                return real(self, name, fill)
            writes["n"] += 1
            if writes["n"] == k and not after:
                raise Killed
            real(self, name, fill)
            if writes["n"] == k:
                raise Killed

        monkeypatch.setattr(ResumeState, "_write", write)
        out = tmp_path / f"twice-{k}"
        with pytest.raises(Killed):
            api.prune_streamed(src, cfg, out, **CALIB)
        assert not out.exists()
        monkeypatch.setattr(ResumeState, "_write", real)
        steps["n"] = 0
        api.prune_streamed(src, cfg, out, **CALIB)
        twice = tensors(out)
        assert twice.keys() == once.keys() and all(torch.equal(once[n], twice[n]) for n in once), (k, after)
        assert not list(tmp_path.glob(f".twice-{k}*"))
        assert 0 < steps["n"] < whole_run or k <= 3, (k, steps["n"], whole_run)


def test_update_frees_each_layers_inverses(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Structured global: once layer i is updated, layer i-1's saved A^-1 goes (a step late, as the gradients),
    so the spill does not hold every layer's inverses to the end of the shot (31 GB on the 7B shape)."""
    seen: list[tuple[int, list[int]]] = []
    real_done = streamed._Walk._layer_done

    def done(self: streamed._Walk, i: int, seconds: float) -> None:
        real_done(self, i, seconds)
        if self.state["phase"] == "update":
            seen.append((i, sorted(int(f.stem.split("-")[1]) for f in self.spill.directory.glob("inverses-*"))))

    monkeypatch.setattr(streamed._Walk, "_layer_done", done)
    api.prune_streamed(src, api.build_config("surgeon", structured=0.7, shots=1), tmp_path / "out", **CALIB)
    n = len(seen)
    assert n >= 2 and seen == [(i, list(range(i, n))) for i in range(n)]


@pytest.mark.parametrize("kwargs", [dict(structured=0.7, shots=1), dict(structured=0.7, shots=2),
                                    dict(sparsity=0.5, shots=2)], ids=["structured", "structured-2-shots", "unstructured"])
def test_spill_estimate_bounds_the_walks_files(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture, kwargs: dict) -> None:
    """``spill_bytes`` is at least the tensors the walk keeps on disk at any layer step (and not wildly more);
    a file system with less free space than the run's peak (the walk's files and the checkpoint) is refused
    before any work, with nothing written; a run that resumes its own files gets a warning and goes on."""
    cfg = api.build_config("surgeon", **kwargs)
    most = {"bytes": 0}
    real_done = streamed._Walk._layer_done

    def done(self: streamed._Walk, i: int, seconds: float) -> None:
        real_done(self, i, seconds)
        most["bytes"] = max(most["bytes"], sum(f.stat().st_size for f in self.spill.directory.glob("*.safetensors")))

    monkeypatch.setattr(streamed._Walk, "_layer_done", done)
    api.prune_streamed(src, cfg, tmp_path / "out", **CALIB)
    lm, lazy = load_model(src), open_lazy(src)
    need = streamed.spill_bytes(lm.model, lm.adapter, cfg, CALIB["calib_samples"], CALIB["seq_len"], ranks=1)
    assert 0 < most["bytes"] <= need < 3 * most["bytes"], (most["bytes"], need)
    checkpoint = lazy.weights.nbytes(lazy.weights.dtype())
    peak = streamed.spill_bytes(lm.model, lm.adapter, cfg, CALIB["calib_samples"], CALIB["seq_len"], ranks=1,
                                checkpoint=checkpoint)
    assert peak >= max(need, checkpoint)
    monkeypatch.setattr(base.files.shutil, "disk_usage", lambda p: type("Usage", (), {"free": peak - 1})())
    with pytest.raises(SurgeonError, match=r"^the streamed LLM Surgeon walk's files and the checkpoint: about "
                                           r"[\d.]+ GiB of disk at the peak, and .* has [\d.]+ GiB free: free space"):
        api.prune_streamed(src, cfg, tmp_path / "refused", **CALIB)
    assert not list(tmp_path.glob("*refused*"))
    (tmp_path / ".resumed.partial").mkdir()  # a run that resumes (its files count in the estimate)
    with caplog.at_level("INFO", logger="base.files"):
        api.prune_streamed(src, cfg, tmp_path / "resumed", **CALIB)
    assert any(r.levelname == "WARNING" and "full disk" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "resumed" / "config.json").is_file()


@pytest.mark.parametrize("where", ["writing layer 1", "after the last layer"])
def test_interrupted_while_writing_the_checkpoint(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  where: str) -> None:
    """Killed in the final pass (a layer's shard written) or after it (spill directory gone, checkpoint
    not yet moved into place): the rerun writes the rest from the saved state, recomputing nothing."""
    from export.streaming import StreamedLayers

    cfg = api.build_config("surgeon", sparsity=0.5, shots=2)
    api.prune_streamed(src, cfg, tmp_path / "once", **CALIB)
    real_leave, real_finish = StreamedLayers.leave, StreamedLayers.finish

    def leave(self: StreamedLayers, index: int, layer: torch.nn.Module, records: dict | None) -> None:
        real_leave(self, index, layer, records)
        if records is not None and index == 1 and where == "writing layer 1":
            raise Killed

    def finish(self: StreamedLayers, report: dict) -> dict:
        raise Killed

    monkeypatch.setattr(StreamedLayers, "leave", leave)
    if where == "after the last layer":
        monkeypatch.setattr(StreamedLayers, "finish", finish)
    with pytest.raises(Killed):
        api.prune_streamed(src, cfg, tmp_path / "twice", **CALIB)
    monkeypatch.setattr(StreamedLayers, "leave", real_leave)
    monkeypatch.setattr(StreamedLayers, "finish", real_finish)
    kfac = {"n": 0}
    real_kfac = streamed.layer_kfac
    monkeypatch.setattr(streamed, "layer_kfac", lambda *a, **k: kfac.__setitem__("n", kfac["n"] + 1) or real_kfac(*a, **k))
    written = api.prune_streamed(src, cfg, tmp_path / "twice", **CALIB)
    assert kfac["n"] == 0 and len(written["shots"]) == 2
    a, b = tensors(tmp_path / "once"), tensors(tmp_path / "twice")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kill_9_and_rerun_the_same_command(src: Path, tmp_path: Path) -> None:
    """A real ``kill -9`` of ``surgeon-export prune --method surgeon --streaming`` in its second shot's
    reverse walk (or later); the same command again finishes with the uninterrupted run's tensors. The killed run
    is a new interpreter on purpose (SIGKILL ends a process); the rerun runs in this one."""
    model, tokenizer = make_tiny_llama(num_hidden_layers=6)
    model.save_pretrained(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "src")
    options = dict(calib_samples=8, seq_len=32, calib_text=CALIB["calib_text"])
    cfg = api.build_config("surgeon", sparsity=0.5, shots=3, kfac_batch=1)
    api.prune_streamed(tmp_path / "src", cfg, tmp_path / "once", **options)  # the same run, uninterrupted
    args = ["prune", str(tmp_path / "src"), "--method", "surgeon", "--sparsity", "0.5", "--shots", "3", "--kfac-batch",
            "1", "--calib-samples", "8", "--seq-len", "32", "--calib-text", str(options["calib_text"]), "--no-eval",
            "--streaming", "--out", str(tmp_path / "twice"), "--json", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "surgeon_export", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    state = tmp_path / ".twice.partial" / "surgeon" / "state.json"
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            seen = json.loads(state.read_text())
        except (OSError, json.JSONDecodeError):
            seen = None
        # in the second shot's reverse walk, or anywhere after it (a slow poll must not miss the run)
        if seen and (seen["shot"], PHASES.index(seen["phase"]), seen["done"]) >= (1, PHASES.index("reverse"), 1):
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "twice").exists()
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    a, b = tensors(tmp_path / "once"), tensors(tmp_path / "twice")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    result = json.loads(again.stdout)
    assert result["streamed"] is True and [s["shot"] for s in result["shots"]] == [1, 2, 3]


def test_bad_input(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SurgeonError, match="--refine sds or --lora-between-shots does not run streamed yet"):
        api.prune_streamed(src, api.build_config("surgeon", pattern="2:4", refine=SDSConfig()), tmp_path / "out")
    assert not list(tmp_path.glob(".out*"))
    lazy = open_lazy(src)
    plan = api.memory_plan(lazy, api.build_config("surgeon", pattern="2:4"), 4, 16, streaming=True)
    with pytest.raises(SurgeonError, match=r"^--max-memory 1.0 MiB is below what one layer needs streamed \((\d+\.\d) MiB"):
        api.memory_plan(lazy, api.build_config("surgeon", pattern="2:4"), 4, 16, max_memory=2**20)
    assert plan.streamed > 4 * 3 * 8 * 64**2  # at least the float64 factors of the widest linear
    full = OSError(errno.ENOSPC, "No space left on device")

    def no_space(*_args: object, **_kwargs: object) -> None:
        raise full

    monkeypatch.setattr(base.resume, "save_file", no_space)
    with pytest.raises(SurgeonError, match=r"^cannot write .*surgeon: no space left on device; nothing was written$"):
        api.prune_streamed(src, api.build_config("surgeon", sparsity=0.5), tmp_path / "out", **CALIB)
    assert not (tmp_path / "out").exists()
    assert not list((tmp_path / ".out.partial" / "surgeon").glob(".*"))  # no temporary left behind


def test_mask_bits_round_trip() -> None:
    for shape in [(3, 5), (8,), (4, 16), (1, 1), (7, 9)]:
        keep = torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape))) > 0.5
        bits = streamed._pack(keep)
        assert bits.dtype == torch.uint8 and bits.numel() == -(-keep.numel() // 8)
        assert torch.equal(streamed._unpack(bits, keep.shape), keep)


def test_bfloat16_source_last_states_in_its_dtype(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bfloat16 source: the walk keeps the states between shots in float32 and the last shot's in bfloat16
    (masks as bits throughout), and writes whole-model LLM Surgeon's weights rounded to bfloat16 once."""
    model, tokenizer = make_tiny_llama(num_hidden_layers=3, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "src")
    cfg = api.build_config("surgeon", structured=0.7, shots=2)
    seen: dict[str, set] = {}
    real_done = streamed._Walk._layer_done

    def done(self: streamed._Walk, i: int, seconds: float) -> None:
        real_done(self, i, seconds)
        for f in self.spill.directory.glob("state-*.safetensors"):
            saved = self.spill.tensors(f.name)
            seen.setdefault(f.name.split("-")[1], set()).update(
                (k.rsplit(".", 1)[1], v.dtype) for k, v in saved.items())

    monkeypatch.setattr(streamed._Walk, "_layer_done", done)
    api.prune_streamed(tmp_path / "src", cfg, tmp_path / "out", **CALIB)
    assert seen == {"1": {("weight", torch.float32), ("keep", torch.uint8)},
                    "2": {("weight", torch.bfloat16), ("keep", torch.uint8)}}
    reference, _ = whole_model(tmp_path / "src", cfg)
    saved = tensors(tmp_path / "out")
    for key, value in saved.items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, reference[key].to(torch.bfloat16)), key
