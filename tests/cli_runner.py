"""The command line in tests: :func:`run_cli` in this process (fast: torch and transformers are imported
once per test process, not once per command), :func:`run_cli_process` in a new interpreter where the
process boundary is the point (a signal, ``kill -9``, ``exec``, another ``PYTHONPATH``, the real exit path).

Both return a :class:`subprocess.CompletedProcess` (``returncode``, ``stdout``, ``stderr``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
import torch

# A fresh interpreter's warning filters (no -W, no PYTHONWARNINGS), in their order.
FRESH_WARNING_FILTERS = (("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, ""),
                         ("ignore", PendingDeprecationWarning, ""), ("ignore", ImportWarning, ""),
                         ("ignore", ResourceWarning, ""))


def run_cli(*args: str, env: dict[str, str] | None = None,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """``surgeon-export ARGS`` through :func:`surgeon_export.cli.main` in this process, as a new process
    would run it: ``sys.argv`` set, the root logger without handlers (the CLI's ``basicConfig`` then
    logs to the captured stderr), a fresh interpreter's warning filters with warnings printed to
    stderr, ``env`` added to the environment, ``cwd`` as the working directory. Python's and the file
    descriptors' output (C libraries, child processes) are both captured; a ``SystemExit`` gives the
    exit code. Everything the command may change is put back afterwards: ``sys.argv``, the
    environment, the working directory, logging (handlers, levels), warning filters, signal
    handlers, torch's thread count, grad mode and default dtype, and the random generators' states.
    Any other exception is the test's failure (a real process would print a traceback).
    """
    from surgeon_export.cli import main

    out, err = io.StringIO(), io.StringIO()
    with tempfile.TemporaryFile() as fd_out, tempfile.TemporaryFile() as fd_err:
        with _restored_state(), _fd_to(1, fd_out), _fd_to(2, fd_err), contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            sys.argv = ["surgeon-export", *args]
            os.environ.update(env or {})
            if cwd is not None:
                os.chdir(cwd)
            try:
                code = main()
            except SystemExit as exc:
                code = exc.code
            if isinstance(code, str):  # sys.exit("message"), as the interpreter does it
                print(code, file=sys.stderr)
                code = 1
        fd_out.seek(0)
        fd_err.seek(0)
        return subprocess.CompletedProcess(["surgeon-export", *args], int(code or 0),
                                           out.getvalue() + fd_out.read().decode(errors="replace"),
                                           err.getvalue() + fd_err.read().decode(errors="replace"))


def run_cli_process(*args: str, env: dict[str, str] | None = None, cwd: str | Path | None = None,
                    timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m surgeon_export ARGS`` in a new interpreter (``env`` added to this environment)."""
    return subprocess.run([sys.executable, "-m", "surgeon_export", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=None if env is None else {**os.environ, **env},
                          stdin=subprocess.DEVNULL)


@contextlib.contextmanager
def _fd_to(fd: int, sink: IO[bytes]) -> Iterator[None]:
    """File descriptor ``fd`` (1 or 2) written to ``sink`` inside the block: C libraries' and child processes' output."""
    (sys.stdout if fd == 1 else sys.stderr).flush()
    saved = os.dup(fd)
    os.dup2(sink.fileno(), fd)
    try:
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


@contextlib.contextmanager
def _restored_state() -> Iterator[None]:
    """The process-wide state a command may change, as a fresh process has it inside, as it was after."""
    argv, environ, cwd = list(sys.argv), dict(os.environ), os.getcwd()
    root = logging.getLogger()
    handlers, disabled = list(root.handlers), logging.root.manager.disable
    levels = {name: (lg.level, lg.disabled) for name, lg in [("", root), *logging.root.manager.loggerDict.items()]
              if isinstance(lg, logging.Logger)}
    handlers_of_signal = {}
    for s in signal.valid_signals():
        with contextlib.suppress(ValueError, OSError):
            handlers_of_signal[s] = signal.getsignal(s)
    threads, grad, dtype = torch.get_num_threads(), torch.is_grad_enabled(), torch.get_default_dtype()
    rng = torch.get_rng_state(), random.getstate(), np.random.get_state()
    root.handlers.clear()
    root.setLevel(logging.WARNING)
    logging.disable(logging.NOTSET)
    try:
        with warnings.catch_warnings():
            warnings.resetwarnings()
            for action, category, module in FRESH_WARNING_FILTERS:
                warnings.filterwarnings(action, category=category, module=module, append=True)
            warnings.showwarning = _print_warning
            yield
    finally:
        sys.argv = argv
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        os.environ.update({k: v for k, v in environ.items() if os.environ.get(k) != v})
        os.chdir(cwd)
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        logging.disable(disabled)
        for name, lg in [("", root), *logging.root.manager.loggerDict.items()]:
            if isinstance(lg, logging.Logger):
                level, lg.disabled = levels.get(name, (logging.NOTSET, False))
                lg.setLevel(level)
        for s, handler in handlers_of_signal.items():
            if handler is not None and signal.getsignal(s) != handler:
                signal.signal(s, handler)
        torch.set_num_threads(threads)
        torch.set_grad_enabled(grad)
        torch.set_default_dtype(dtype)
        torch.set_rng_state(rng[0])
        random.setstate(rng[1])
        np.random.set_state(rng[2])


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """A warning on stderr, as a fresh interpreter prints it (pytest would collect it instead)."""
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
