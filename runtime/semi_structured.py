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
  input is padded and its output cut back, in :class:`PaddedLinear`) when that adds at most
  ``MAX_PAD - 1`` = 25% to its size; otherwise it stays dense, and the reason says why.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Kernel = Literal["cusparselt", "cutlass", "dense"]
Prefer = Literal["auto", "cusparselt", "cutlass"]
HALF_DTYPES = (torch.float16, torch.bfloat16)
MULTIPLE: dict[str, tuple[int, int]] = {"cusparselt": (16, 16), "cutlass": (32, 64)}  # (rows, cols), fp16/bf16
MAX_PAD = 1.25  # pad a layer by at most this factor of its size; beyond, it stays dense


@dataclass(frozen=True)
class Dispatch:
    """Where one 2:4 weight runs, why, and the (padded) shape handed to the kernel."""

    kernel: str  # a Kernel; the loader also records "csr" / "bsr" placements this way
    reason: str
    shape: tuple[int, int]

    def to_dict(self) -> dict:
        return {"kernel": self.kernel, "reason": self.reason, "shape": list(self.shape)}


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


class PaddedLinear(nn.Module):
    """A linear whose weight was padded with zero rows/columns: pads the input, cuts the output back."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [R', C'] >= [out, in], zero-padded
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.weight.shape[1] - self.in_features
        if pad:
            x = F.pad(x, (0, pad))  # [..., C']
        y = F.linear(x, self.weight)[..., : self.out_features]  # [..., out]
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


def to_semi_structured_linear(linear: nn.Linear, dispatch: Dispatch) -> nn.Module:
    """The module to use in place of ``linear`` (on CUDA, 2:4 weight) for a non-dense ``dispatch``.

    Without padding the weight is swapped in place for a semi-structured tensor (``linear`` itself is
    returned); with padding a :class:`PaddedLinear` is returned.
    """
    W = linear.weight.detach()
    padded = dispatch.shape != tuple(W.shape)
    if padded:
        W = pad_weight(W, dispatch.shape)
    with force_cutlass(dispatch.kernel == "cutlass"):
        sparse = torch.sparse.to_sparse_semi_structured(W.contiguous())
    if padded:
        bias = None if linear.bias is None else linear.bias.detach()
        return PaddedLinear(sparse, bias, linear.in_features, linear.out_features)
    linear.weight = nn.Parameter(sparse, requires_grad=False)
    return linear
