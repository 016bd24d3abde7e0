"""Latency and peak-memory primitives (BENCHMARK_PROTOCOL.md, "Latency and memory").

- Prompts are synthetic: uniformly random token ids from a seeded generator, identical for every
  model of a run (nanoGPT:bench.py offers the same), so no corpus is read for timing.
- Prefill: one forward pass of the backend over a ``[B, T]`` prompt into an empty cache, keeping
  only the last position's logits (as generation does).
- Decode: an untimed prefill, then ``N`` timed greedy steps with the backend's KV cache, one token
  per sequence each, no stop tokens, by the one decode loop every backend shares
  (:func:`runtime.generate.generate`); tokens/s = ``B * N / seconds``.
- Clocks: :class:`runtime.generate.Stopwatch` (CUDA events after ``torch.cuda.synchronize()`` on
  GPU, ``time.perf_counter`` on CPU).
- Peak memory: ``torch.cuda.max_memory_allocated`` on GPU. On CPU the peak resident set size of the
  process (``VmHWM``), reset before each measurement by writing ``5`` to ``/proc/self/clear_refs``
  after ``malloc_trim(0)`` has handed freed heap back to the kernel; where that is not possible,
  ``ru_maxrss`` (the peak over the whole process life) and the JSON says so.
"""

from __future__ import annotations

import ctypes
import re
import resource
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from runtime.backend import Backend
from runtime.generate import GenerationConfig, Stopwatch, generate

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def synthetic_prompt(batch: int, length: int, vocab_size: int, seed: int) -> torch.Tensor:
    """Random token ids ``[batch, length]`` (long), the same for every model given the same seed."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=gen)


def time_prefill(backend: Backend, prompt: torch.Tensor) -> float:
    """Seconds for one prefill of ``prompt`` ``[B, T]`` into an empty cache (last-position logits only)."""
    batch, length = prompt.shape
    backend.reset(batch)
    mask = torch.ones(batch, length, dtype=torch.long)
    watch = Stopwatch(backend.device)
    watch.start()
    backend.forward(prompt, mask, torch.arange(length).expand(batch, length), last_only=True)
    return watch.stop()  # logits are back on the host: the device has finished


def time_decode(backend: Backend, prompt: torch.Tensor, new_tokens: int) -> tuple[list[list[int]], float]:
    """``new_tokens`` greedy KV-cache steps after an untimed prefill of ``prompt`` ``[B, T]``, by the one
    decode loop (:func:`runtime.generate.generate`, no stop tokens): the tokens fed to the timed
    steps (``[B][new_tokens]``) and their seconds."""
    out = generate(backend, prompt.tolist(), GenerationConfig(max_new_tokens=new_tokens + 1))
    return [row[:new_tokens] for row in out.tokens], out.decode_seconds


def _vm_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise OSError(f"{field} not in {_STATUS}")
    return int(match.group(1))


def memory_method(device: torch.device) -> str:
    """How :func:`read_peak` measures on this device (recorded in every result)."""
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated"
    try:
        _vm_kib("VmHWM")
        with _CLEAR_REFS.open("w"):
            pass
        return "peak RSS (VmHWM, reset per measurement)"
    except OSError:
        return "peak RSS (ru_maxrss, whole process life)"


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory window (see the module docstring for how, per device)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap pages so they do not count
    except (OSError, AttributeError):
        pass  # not glibc: the peak may then include memory freed by earlier measurements
    try:
        _CLEAR_REFS.write_text("5")  # "5" resets VmHWM to the current RSS (proc(5))
    except OSError:
        pass  # read_peak falls back to ru_maxrss, as memory_method reports


def read_peak(device: torch.device) -> int:
    """Peak bytes since :func:`reset_peak`: allocated GPU memory, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        return _vm_kib("VmHWM") * 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new allocations: ``cudaMemGetInfo`` on GPU, ``MemAvailable`` on CPU; None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    match = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def estimate_bytes(config: Any, batch: int, length: int, element_size: int = 4) -> int:
    """Rough working memory of a forward pass over ``[batch, length]`` tokens with a KV cache of ``length``.

    Counts the KV cache (2 x layers x B x T x kv_heads x head_dim), the widest activations of one
    layer (hidden and MLP states), one attention score matrix (B x heads x T x T, the worst case
    for kernels that materialise it) and the last-position logits. Used only to skip cells that
    cannot fit, not as a measurement.
    """
    c = config
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    kv = 2 * c.num_hidden_layers * batch * length * c.num_key_value_heads * head_dim
    acts = batch * length * (4 * c.hidden_size + 3 * c.intermediate_size)
    scores = batch * heads * length * length
    return element_size * (kv + acts + scores + batch * c.vocab_size)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an exception is an allocation failure (CUDA OOM or the CPU allocator giving up)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(
        text in str(exc) for text in ("out of memory", "can't allocate memory")
    )


@dataclass
class Stats:
    """Median and spread of repeated measurements (raw samples kept, in repetition order)."""

    median: float
    min: float
    max: float
    q1: float
    q3: float
    n: int
    samples: list[float]

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(samples: list[float]) -> Stats:
    """Median, min/max and quartiles (inclusive method) of at least one sample."""
    if not samples:
        raise ValueError("no samples to summarize")
    if len(samples) == 1:
        q1 = q3 = samples[0]
    else:
        q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return Stats(statistics.median(samples), min(samples), max(samples), q1, q3, len(samples), list(samples))


def cell_problem(config: object, device: torch.device, batch: int, length: int) -> str | None:
    """Why a forward over ``[batch, length]`` cannot run on ``device`` (context or memory), or None."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and length > limit:
        return f"{length} tokens exceed the model's context ({limit})"
    need = estimate_bytes(config, batch, length)
    free = available_memory(device)
    if free is not None and need > 0.8 * free:
        return f"needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB available"
    return None
