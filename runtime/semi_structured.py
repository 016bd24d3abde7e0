"""2:4 weights on the GPU: which kernel (cuSPARSELt, CUTLASS or none) and the conversion to it.

:func:`choose_backend` is the whole dispatch decision as a pure function of the device's compute
capability, the dtype and the weight's shape; :func:`to_semi_structured_linear` carries it out with
``torch.sparse.to_sparse_semi_structured``. The rules follow torch 2.x
(``torch/sparse/semi_structured.py``, ``_DTYPE_SHAPE_CONSTRAINTS``, and torch's own tests):

- 2:4 sparse tensor cores exist from sm80 (Ampere) on; below that, or without CUDA, weights stay dense;
- cuSPARSELt (torch's default) where ``torch.backends.cusparselt.is_available()``, on sm80 and newer;
  CUTLASS (``SparseSemiStructuredTensor._FORCE_CUTLASS``) only on sm8x: torch builds those kernels
  for Ampere alone;
- float16 and bfloat16 only (float32 would run CUTLASS in TF32, a different numeric result, and
  cuSPARSELt has no float32 kernel);
- the weight's rows and columns must be multiples of (16, 16) for cuSPARSELt, (32, 64) for
  CUTLASS. A layer that is not is padded with zero rows and columns (zeros keep the 2:4 pattern; its
  input is padded and its output cut back, in :class:`SemiStructuredLinear`) when that adds at most
  ``MAX_PAD - 1`` = 25% to its size; otherwise it stays dense, and the reason says why.

Whether the kernel is *faster* is measured, not assumed (2:4 kernels often lose to dense at few
tokens, where the matmul is bound by memory and launch costs): under the ``auto`` policy,
:func:`tune` times each distinct kernel shape against dense at :data:`PROBE_TOKENS` on the device
itself, and :func:`switch_point` turns the timings into a threshold. A layer whose kernel never wins
stays dense (reason recorded); one that wins only from ``t`` tokens on keeps a dense copy of its
weight too and runs dense for calls of fewer tokens (:class:`SemiStructuredLinear`), at the memory
of both; the ``sparse`` policy skips the measurement and keeps 2:4 weights only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from base.patterns import NMPattern

Kernel = Literal["cusparselt", "cutlass", "dense"]
Prefer = Literal["auto", "cusparselt", "cutlass"]
Policy = Literal["auto", "sparse"]  # measure and use the faster per layer and token count / 2:4 wherever it runs
HALF_DTYPES = (torch.float16, torch.bfloat16)
MULTIPLE: dict[str, tuple[int, int]] = {"cusparselt": (16, 16), "cutlass": (32, 64)}  # (rows, cols), fp16/bf16
MAX_PAD = 1.25  # pad a layer by at most this factor of its size; beyond, it stays dense
PROBE_TOKENS = (1, 8, 32, 128, 512, 2048)  # token counts (rows of x) at which `auto` times sparse vs dense
MIN_GAIN = 0.03  # the 2:4 kernel counts as faster when it takes less than 97% of dense's time
T = TypeVar("T")


@dataclass(frozen=True)
class Dispatch:
    """Where one 2:4 weight runs, why, and the (padded) shape handed to the kernel."""

    kernel: str  # a Kernel; the loader also records "csr" / "bsr" placements this way
    reason: str
    shape: tuple[int, int]
    dense_below: int = 0  # calls of fewer tokens run on a dense copy of the weight (measured: dense is faster there)

    def to_dict(self) -> dict:
        return {"kernel": self.kernel, "reason": self.reason, "shape": list(self.shape), "dense_below": self.dense_below}


def _padded(shape: tuple[int, int], multiple: tuple[int, int]) -> tuple[int, int]:
    return (math.ceil(shape[0] / multiple[0]) * multiple[0], math.ceil(shape[1] / multiple[1]) * multiple[1])


def choose_backend(
    capability: tuple[int, int] | None,
    dtype: torch.dtype,
    shape: tuple[int, int],
    *,
    cusparselt: bool = True,
    prefer: Prefer = "auto",
) -> Dispatch:
    """Pick the kernel for a 2:4 weight ``[R, C]`` (rules in the module docstring).

    Args:
        capability: ``torch.cuda.get_device_capability()``, or None without a CUDA device.
        dtype: the weight's dtype at run time.
        shape: ``(R, C)`` = (out_features, in_features).
        cusparselt: ``torch.backends.cusparselt.is_available()``.
        prefer: ``"auto"`` (cuSPARSELt, else CUTLASS), or force one of them.

    Example:
        >>> choose_backend((8, 0), torch.float16, (1536, 576)).kernel
        'cusparselt'
        >>> choose_backend(None, torch.float16, (1536, 576)).reason
        'no CUDA device: dense weights (2:4 kernels need an sm80+ GPU)'
    """
    if capability is None:
        return Dispatch("dense", "no CUDA device: dense weights (2:4 kernels need an sm80+ GPU)", shape)
    sm = f"sm{capability[0]}{capability[1]}"
    if capability[0] < 8:
        return Dispatch("dense", f"{sm}: 2:4 sparse tensor cores need sm80 or newer", shape)
    if dtype not in HALF_DTYPES:
        return Dispatch("dense", f"{str(dtype).removeprefix('torch.')}: 2:4 kernels take float16 or bfloat16", shape)
    candidates: list[Kernel] = []
    if cusparselt and prefer in ("auto", "cusparselt"):
        candidates.append("cusparselt")
    if capability[0] == 8 and prefer in ("auto", "cutlass"):
        candidates.append("cutlass")
    if not candidates:
        why = {"cutlass": "CUTLASS 2:4 kernels are built for sm8x only",
               "cusparselt": "cuSPARSELt is not available in this torch build"}
        detail = why[prefer] if prefer != "auto" else "no cuSPARSELt in this torch build, and CUTLASS needs sm8x"
        return Dispatch("dense", f"{sm}: {detail}", shape)
    kernel = candidates[0]
    padded = _padded(shape, MULTIPLE[kernel])
    if padded == shape:
        return Dispatch(kernel, f"{sm} {kernel}", shape)
    growth = padded[0] * padded[1] / (shape[0] * shape[1])
    if growth > MAX_PAD:
        return Dispatch("dense", f"{sm}: shape {list(shape)} would need padding to {list(padded)} for {kernel} "
                                 f"(+{growth - 1:.0%}, more than {MAX_PAD - 1:.0%})", shape)
    return Dispatch(kernel, f"{sm} {kernel}, padded from {list(shape)} to {list(padded)}", padded)


def device_dispatch(device: torch.device, dtype: torch.dtype, shape: tuple[int, int], prefer: Prefer = "auto") -> Dispatch:
    """:func:`choose_backend` for ``device`` as it is (capability and cuSPARSELt read from torch)."""
    if device.type != "cuda":
        return choose_backend(None, dtype, shape)
    return choose_backend(torch.cuda.get_device_capability(device), dtype, shape,
                          cusparselt=torch.backends.cusparselt.is_available(), prefer=prefer)


def winning_tail(wins: Mapping[T, bool]) -> T | None:
    """The smallest key from which every larger key wins; None when the largest does not.

    Example:
        >>> winning_tail({1: False, 8: True, 32: False, 128: True, 512: True})
        128
    """
    start = None
    for key in sorted(wins, reverse=True):  # type: ignore[type-var]
        if not wins[key]:
            break
        start = key
    return start


def switch_point(times: Mapping[int, tuple[float, float]], min_gain: float = MIN_GAIN) -> int | None:
    """From ``{tokens: (sparse_s, dense_s)}``: the fewest probed tokens from which the 2:4 kernel is
    faster at every larger probe (by more than ``min_gain``), or None when it is not faster at the largest."""
    return winning_tail({m: sparse < dense * (1 - min_gain) for m, (sparse, dense) in times.items()})


def tuned(decision: Dispatch, shape: tuple[int, int], times: Mapping[int, tuple[float, float]]) -> Dispatch:
    """``decision`` (a 2:4 kernel for a weight of ``shape``) after the timings of :func:`tune`: kept,
    kept with a dense copy below a token count, or dense."""
    ratios = ", ".join(f"{m}: {s / d:.2f}" for m, (s, d) in sorted(times.items()))
    start = switch_point(times)
    if start is None:
        return Dispatch("dense", f"{decision.reason}: not faster than dense at {max(times)} tokens "
                                 f"(2:4/dense time per token count: {ratios})", shape)
    if start == min(times):
        return replace(decision, reason=f"{decision.reason}, faster than dense at every measured size ({ratios})")
    return replace(decision, dense_below=start,
                   reason=f"{decision.reason}, from {start} tokens; dense below ({ratios})")


class SemiStructuredLinear(nn.Module):
    """A 2:4 linear whose kernel needed padding, or which keeps a dense copy for small calls.

    ``sparse [R', C']`` (the 2:4 weight, zero-padded to the kernel's multiples) serves calls of at
    least ``dense_below`` tokens: the input is padded and the output cut back to ``out_features``.
    Smaller calls run ``dense [out, in]`` (when given) with plain ``F.linear``.
    """

    def __init__(self, sparse: torch.Tensor, bias: torch.Tensor | None, in_features: int, out_features: int,
                 dense: torch.Tensor | None = None, dense_below: int = 0) -> None:
        super().__init__()
        self.weight = nn.Parameter(sparse, requires_grad=False)
        self.dense = None if dense is None else nn.Parameter(dense, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.in_features, self.out_features, self.dense_below = in_features, out_features, dense_below

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None and x.numel() < self.dense_below * self.in_features:  # fewer tokens than dense_below
            return F.linear(x, self.dense, self.bias)
        pad = self.weight.shape[1] - self.in_features
        if pad:
            x = F.pad(x, (0, pad))  # [..., C']
        y = F.linear(x, self.weight)
        if self.weight.shape[0] != self.out_features:
            y = y[..., : self.out_features]  # [..., out]
        return y if self.bias is None else y + self.bias


def pad_weight(W: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``W [R, C]`` with zero rows and columns appended up to ``shape``."""
    return F.pad(W, (0, shape[1] - W.shape[1], 0, shape[0] - W.shape[0])).contiguous()


@contextmanager
def force_cutlass(flag: bool) -> Iterator[None]:
    """Set ``SparseSemiStructuredTensor._FORCE_CUTLASS`` for one conversion, restoring it after."""
    from torch.sparse import SparseSemiStructuredTensor

    previous = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = flag
    try:
        yield
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = previous


def semi_structured(W: torch.Tensor, dispatch: Dispatch) -> torch.Tensor:
    """``W`` (2:4, on CUDA) padded to ``dispatch.shape`` and converted for ``dispatch.kernel``."""
    if dispatch.shape != tuple(W.shape):
        W = pad_weight(W, dispatch.shape)
    with force_cutlass(dispatch.kernel == "cutlass"):
        return torch.sparse.to_sparse_semi_structured(W.contiguous())


def to_semi_structured_linear(linear: nn.Linear, dispatch: Dispatch) -> nn.Module:
    """The module to use in place of ``linear`` (on CUDA, 2:4 weight) for a non-dense ``dispatch``.

    Without padding or a dense copy the weight is swapped in place for a semi-structured tensor
    (``linear`` itself is returned); otherwise a :class:`SemiStructuredLinear` is returned.
    """
    W = linear.weight.detach()
    sparse = semi_structured(W, dispatch)
    if dispatch.shape == tuple(W.shape) and not dispatch.dense_below:
        linear.weight = nn.Parameter(sparse, requires_grad=False)
        return linear
    bias = None if linear.bias is None else linear.bias.detach()
    return SemiStructuredLinear(sparse, bias, linear.in_features, linear.out_features,
                                dense=W if dispatch.dense_below else None, dense_below=dispatch.dense_below)


def cuda_paired(fns: Mapping[str, Callable[[], object]], repeat: int, calls: int = 20) -> dict[str, list[float]]:
    """Seconds per call of each function: ``repeat`` repetitions of ``calls`` calls, alternating
    which goes first, timed with CUDA events after synchronising (after 3 warm-up calls each)."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    samples: dict[str, list[float]] = {n: [] for n in fns}
    names = list(fns)
    for rep in range(repeat):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fns[name]()
            end.record()
            torch.cuda.synchronize()
            samples[name].append(start.elapsed_time(end) / 1000 / calls)
    return samples


def tune(decision: Dispatch, shape: tuple[int, int], dtype: torch.dtype, device: torch.device,
         tokens: tuple[int, ...] = PROBE_TOKENS, repeat: int = 5) -> dict[int, tuple[float, float]]:
    """``{tokens: (sparse_s, dense_s)}`` on a CUDA ``device``: median seconds per call of the module
    :func:`to_semi_structured_linear` makes for ``decision`` (padding included) from a random 2:4
    weight of ``shape``, and of ``F.linear`` with that weight dense, at each token count."""
    rows, cols = shape
    gen = torch.Generator(device=device).manual_seed(0)
    keep = NMPattern().mask_from_scores(torch.rand(rows, cols, generator=gen, device=device))  # 2 of every 4
    W = torch.randn(rows, cols, generator=gen, device=device, dtype=dtype) * keep
    linear = nn.Linear(cols, rows, bias=False, device=device, dtype=dtype)
    linear.weight = nn.Parameter(W.clone(), requires_grad=False)
    module = to_semi_structured_linear(linear, replace(decision, dense_below=0))
    times = {}
    with torch.no_grad():
        for m in tokens:
            x = torch.randn(m, cols, generator=gen, device=device, dtype=dtype)
            s = cuda_paired({"sparse": lambda: module(x), "dense": lambda: F.linear(x, W)}, repeat)
            times[m] = (float(torch.tensor(s["sparse"]).median()), float(torch.tensor(s["dense"]).median()))
    return times
