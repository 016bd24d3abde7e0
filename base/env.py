"""What every published number is recorded with (BENCHMARK_PROTOCOL.md, "Latency and memory")."""

from __future__ import annotations

import datetime as dt
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

from base.formats import dtype_name


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """The short commit of this checkout, with ``+dirty`` when tracked files under base/, surgeon/,
    export/, runtime/, surgeon_export/ or benchmarks/ differ from it (the numbers then come from
    uncommitted code)."""
    repo = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5, check=False,
        )
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no", "--",
             "base", "surgeon", "export", "runtime", "surgeon_export", "benchmarks/*.py"],
            capture_output=True, text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return (commit + ("+dirty" if dirty.stdout.strip() else "")) if commit else None


_MALLOC_TRIM: object = None  # glibc's malloc_trim once looked up; False where there is none


def trim_heap() -> None:
    """Hand the C heap's free memory back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    Streamed pruning frees one layer's tensors and allocates the next one's, many times over. glibc
    raises its mmap threshold after large frees, so later tensors of a few MiB come from the heap,
    whose freed pages stay resident: on the default model the streamed Wanda run crept from 0.66 to
    1.94 GiB over 30 layers without it, 1.15 GiB with it (0.86 GiB with a fixed threshold, 40% slower).
    Called after each streamed layer (:meth:`base.lazy.LazyModel.release`).
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _MALLOC_TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_PEAK_BEFORE_RESET = 0.0  # MiB: the process's peak before PeakWindow last reset the kernel's mark


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB).

    ``ru_maxrss`` is the kernel's high-water mark, which :class:`PeakWindow` resets; the peak from
    before a reset is kept here, so this stays the peak of the whole process life.
    """
    import resource

    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, _PEAK_BEFORE_RESET)


class PeakWindow:
    """Peak resident set size within a stretch of work (one layer's step), not since the process began.

    Linux keeps a resettable high-water mark (``VmHWM``, which ``ru_maxrss`` reads too; writing 5 to
    ``/proc/self/clear_refs`` resets it to the current size). The peak before the reset is folded into
    :func:`peak_rss_mib` first. Elsewhere the window is the process's peak.
    """

    def __init__(self) -> None:
        global _PEAK_BEFORE_RESET
        _PEAK_BEFORE_RESET = peak_rss_mib()
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass

    def peak_mib(self) -> float:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_name(device: torch.device | str = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """Device, library versions, dtype, threads, date and git commit, as a JSON-ready dict."""
    return {
        "device": device_name(device),
        "device_type": torch.device(device).type,
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "onnxruntime": _version("onnxruntime"),
        "surgeon_export": _version("surgeon-export"),
        "python": platform.python_version(),
        "dtype": dtype_name(dtype),
        "threads": torch.get_num_threads(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
    }
