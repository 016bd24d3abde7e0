"""One model per worker: the runner's side of the benchmark, in its own process or inline.

Why a process per model: on CPU the only honest peak memory is the process's peak resident set
size, and a process that holds every model of a run would count all of them in each. A worker
holds one model, so its peak RSS (reset before each measurement, see :mod:`benchmarks.latency`)
is that model's footprint; a crash or an out-of-memory kill also takes down one model, not the
run; and a backend may name another interpreter (another torch install) for its worker. The
coordinator (:mod:`benchmarks.run`) sends one request at a time, round-robin over the workers, so
repetitions interleave between models while only one of them computes at any moment.

Protocol: one JSON object per line on stdin, one reply per line on a private copy of stdout
(``fd 1`` itself is redirected to stderr, so stray prints cannot corrupt the stream). Replies
are ``{"ok": ...}`` or ``{"error": "user" | "oom" | "bug", "message": ...}``. ``inline`` mode
calls :meth:`Worker.handle` directly (tests, or when processes are not wanted); its memory
numbers then cover every model of the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import IO

import torch

from base.data import TokenSource, check_window, eval_tokens
from base.errors import SurgeonError
from base.files import write_file
from base.perplexity import perplexity
from benchmarks import latency
from runtime.backend import Backend, load_backend

REPO = Path(__file__).resolve().parents[1]


class OutOfMemory(Exception):
    """A measurement ran out of memory; the coordinator skips that cell for that model."""


class Worker:
    """Serves requests for one model on one runtime backend: load, check, perplexity, prefill, decode."""

    def __init__(self) -> None:
        self.backend: Backend | None = None
        self.loaded: dict = {}  # the load request, with the dtype and device the backend chose
        self._prompts: dict[tuple[int, int, int], torch.Tensor] = {}  # the last synthetic prompt, reused

    def handle(self, request: dict) -> dict:
        """Answer one request; user errors and out-of-memory become error replies, bugs raise."""
        try:
            return {"ok": self._dispatch(request)}
        except SurgeonError as exc:
            return {"error": "user", "message": str(exc)}
        except Exception as exc:  # only allocation failures are answered; anything else re-raises
            if not latency.is_out_of_memory(exc):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return {"error": "oom", "message": str(exc).strip().splitlines()[0][:200]}

    def _dispatch(self, r: dict) -> object:
        op = r["op"]
        if op == "load":
            from base.env import environment

            self.backend = backend = load_backend(r["backend"], r["spec"], device=r["device"],
                                                  dtype=r.get("dtype", "auto"), threads=r.get("threads"))
            artefact = backend.describe()
            self.loaded = {**r, "dtype": artefact["dtype"], "device": str(backend.device)}
            return {"artefact": artefact,
                    "environment": {**environment(backend.device), "dtype": artefact["dtype"]},
                    "memory_method": latency.memory_method(backend.device)}
        backend = self.backend
        if backend is None:
            raise RuntimeError(f"request {op!r} before load")
        if op == "check":
            return latency.cell_problem(backend.config, backend.device, r["batch"], r["length"])
        if op == "perplexity":
            check_window(r["seq_len"], backend.config)
            tokens = eval_tokens(backend.tokenizer, r["text"], r["data_dir"])

            def measure() -> dict:
                result = perplexity(backend, tokens.ids, seq_len=r["seq_len"], max_windows=r["windows"],
                                    batch_size=r["batch_size"], progress=r["progress"], bos=tokens.bos)
                return {**result.to_dict(), "text": tokens.origin}

            return cached_perplexity(self.loaded, tokens, r, measure) if r.get("cache") else measure()
        if op in ("prefill", "decode"):
            prompt = self._prompt(r["batch"], r["length"], r["seed"], backend.vocab_size)
            latency.reset_peak(backend.device)
            if op == "prefill":
                seconds = latency.time_prefill(backend, prompt)
            else:
                seconds = latency.time_decode(backend, prompt, r["new_tokens"])[1]
            return {"seconds": seconds, "peak_bytes": latency.read_peak(backend.device)}
        raise RuntimeError(f"unknown request {op!r}")

    def _prompt(self, batch: int, length: int, seed: int, vocab_size: int) -> torch.Tensor:
        key = (batch, length, seed)
        if key not in self._prompts:
            self._prompts = {key: latency.synthetic_prompt(batch, length, vocab_size, seed)}
        return self._prompts[key]


PERPLEXITY_CACHE_FORMAT = 1  # bump when what a cached perplexity means changes


def cached_perplexity(loaded: dict, tokens: TokenSource, r: dict, measure: Callable[[], dict]) -> dict:
    """``measure()``'s perplexity, kept in our cache (``perplexity/`` under :func:`base.loading.cache_dir`) and
    taken from it while everything that could change the number is the same: the model's files (their
    SHA-256), the evaluation tokens, windows, window length, batch size, runtime, dtype, device, threads and
    the library versions. A value taken from the cache says when it was measured (``cached``)."""
    from base.env import environment
    from base.loading import cache_dir, directory_digest, resolve_model_dir

    env = {k: v for k, v in environment(loaded["device"]).items() if k not in ("date", "git_commit", "dtype")}
    key = {"format": PERPLEXITY_CACHE_FORMAT, "model": directory_digest(resolve_model_dir(loaded["spec"])[0]),
           "tokens": hashlib.sha256(tokens.ids.numpy().tobytes()).hexdigest(), "bos": tokens.bos,
           "backend": loaded["backend"], "dtype": loaded["dtype"], "environment": env,
           **{k: r[k] for k in ("windows", "seq_len", "batch_size")}}
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    path = cache_dir() / "perplexity" / f"{name}.json"
    try:
        found = json.loads(path.read_text())
        if found["key"] == key:
            return {**found["perplexity"], "cached": {"measured": found["measured"], "file": str(path)}}
    except (OSError, ValueError, KeyError, TypeError):  # absent or unreadable: measured again and rewritten
        pass
    result = measure()
    try:
        write_file(path, json.dumps({"key": key, "measured": environment()["date"], "perplexity": result}, indent=1))
    except OSError as exc:  # a read-only cache costs the next run the measurement, nothing else
        logging.getLogger(__name__).warning("perplexity not cached (%s): %s", path, exc)
    return result


class InlineClient:
    """A worker in this process."""

    def __init__(self, label: str) -> None:
        self.label, self.worker = label, Worker()

    def call(self, request: dict) -> object:
        return _unwrap(self.worker.handle(request), self.label)

    def close(self) -> None:
        self.worker.backend = None

    kill = close


class ProcessClient:
    """A worker in a child process (``python -m benchmarks.worker``)."""

    def __init__(self, label: str, quiet: bool = False, python: str | None = None) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
        self.label = label
        try:
            self.proc = subprocess.Popen(
                [python or sys.executable, "-m", "benchmarks.worker", *(["--quiet"] if quiet else [])],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                start_new_session=True,  # Ctrl-C reaches the coordinator only, which stops the workers
            )
        except OSError as exc:
            raise SurgeonError(f"cannot start the benchmark worker for {label} with {python}: {exc}") from None

    def call(self, request: dict) -> object:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            code = self.proc.wait()
            hint = " (killed: likely out of memory; shrink the grid)" if code in (-9, 137) else ""
            raise SurgeonError(
                f"benchmark worker for {self.label} exited with code {code} during {request['op']}{hint}")
        return _unwrap(json.loads(line), self.label)

    def kill(self) -> None:
        """Stop the worker at once (the run was interrupted): no reply is awaited."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def _unwrap(reply: dict, label: str) -> object:
    if "ok" in reply:
        return reply["ok"]
    if reply["error"] == "user":
        raise SurgeonError(reply["message"])
    if reply["error"] == "oom":
        raise OutOfMemory(reply["message"])
    raise RuntimeError(f"benchmark worker for {label} failed:\n{reply['message']}")


def serve(requests: IO[str], replies: IO[str]) -> None:
    """Answer requests line by line until ``quit`` or end of input; bugs are sent back as tracebacks."""
    worker = Worker()
    for line in requests:
        request = json.loads(line)
        if request["op"] == "quit":
            return
        try:
            reply = worker.handle(request)
        except Exception:  # a bug: the coordinator raises it with this traceback
            reply = {"error": "bug", "message": traceback.format_exc()}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def main() -> None:
    """Worker entry point: keep a private copy of stdout for replies, send fd 1 to stderr."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    logging.basicConfig(level=logging.WARNING if "--quiet" in sys.argv else logging.INFO,
                        format="%(message)s", stream=sys.stderr)
    serve(sys.stdin, replies)


if __name__ == "__main__":
    main()
