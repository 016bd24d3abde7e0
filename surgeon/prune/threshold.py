"""Turn removal costs into masks: global allocation, N:M and per-layer fractions, shot schedule.

LLM Surgeon (van der Ouderaa et al., ICLR 2024, arXiv 2312.17244, Sec. 4-5): every cost estimates
the same loss increase ``ΔL = ½ θ_Qᵀ ([F⁻¹]_QQ)⁻¹ θ_Q``, so costs compare across layers. Sorting all
candidates of the model and removing the cheapest until the shot's target size is reached lets
layers end up with different sizes (a per-layer floor keeps any layer from vanishing). Shots
follow a linear schedule of remaining size, e.g. 100% -> 70% in T steps.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from base.errors import SurgeonError
from base.patterns import check_sparsity


def linear_schedule(end: float, shots: int, start: float = 1.0) -> list[float]:
    """Remaining-size fractions after each of ``shots`` shots, linear from ``start`` to ``end``.

    Args:
        end: remaining fraction after the last shot, in ``(0, start]``.
        shots: number of shots, at least 1.
        start: remaining fraction before the first shot (1.0: the dense model).

    Example:
        >>> [round(x, 6) for x in linear_schedule(0.7, 3)]
        [0.9, 0.8, 0.7]
    """
    if shots < 1:
        raise SurgeonError(f"need at least one shot, got {shots}")
    if not 0.0 < end <= start <= 1.0:
        raise SurgeonError(f"need 0 < end <= start <= 1 for the schedule, got {start} -> {end}")
    fractions = [start + (end - start) * t / shots for t in range(1, shots + 1)]
    fractions[-1] = end  # exact final target, free of rounding in the interpolation
    return fractions


def per_layer_fraction_mask(costs: Tensor, fraction: float) -> Tensor:
    """Keep-mask removing exactly ``round(fraction * numel)`` cheapest entries of one layer.

    Args:
        costs: removal costs of any shape, e.g. ``[d_out, d_in]`` (ties: lower index goes first).
        fraction: sparsity in ``[0, 1)``.

    Example:
        >>> per_layer_fraction_mask(torch.tensor([[3.0, 1.0], [2.0, 4.0]]), 0.5).tolist()
        [[True, False], [False, True]]
    """
    check_sparsity(fraction)
    flat = costs.flatten()  # [numel]
    n_removed = round(fraction * flat.numel())
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[flat.argsort(stable=True)[:n_removed]] = False
    return keep.view(costs.shape)


CostSource = Callable[[], Iterable[tuple[str, Tensor]]]
"""Every linear's removal costs, ``(name, costs)``, afresh on each call: a dict's items in memory, or
read back from disk one linear at a time (streamed LLM Surgeon), so the threshold never needs all
costs at once."""


@dataclass(frozen=True)
class GlobalThreshold:
    """Where a global allocation cuts: remove costs ``<= value``, except in the ``capped`` linears,
    which lose exactly their ceiling's count of cheapest weights (:func:`global_mask`)."""

    value: float
    capped: dict[str, int] = field(default_factory=dict)


def global_threshold(
    costs: CostSource, sizes: Mapping[str, int], fraction: float, max_layer_fraction: float
) -> GlobalThreshold:
    """The cut that removes the cheapest ``fraction`` of all weights across layers, at most
    ``max_layer_fraction`` of any one.

    Costs are comparable across layers (all estimate the same loss increase). Layers that would
    exceed the ceiling are capped at it, and their excess is re-allocated to the others by
    repeating the threshold search over the remaining layers. The threshold is the k-th smallest
    cost in float32 (:func:`kth_smallest`), found in a few passes over ``costs``.

    Args:
        costs: ``(name, costs [any shape])`` of every linear, in any order, on each call.
        sizes: ``{name: numel}`` of every linear.
    """
    budget = round(fraction * sum(sizes.values()))
    capped: dict[str, int] = {}
    while True:
        need = budget - sum(capped.values())
        free = sum(n for name, n in sizes.items() if name not in capped)

        def free_costs() -> Iterator[Tensor]:
            return (c for name, c in costs() if name not in capped)

        threshold = -float("inf") if need <= 0 else kth_smallest(free_costs, min(need, free))
        over = {}
        for name, c in costs():
            if name not in capped and int((c <= threshold).sum()) > int(max_layer_fraction * c.numel()):
                over[name] = int(max_layer_fraction * c.numel())
        if not over:
            return GlobalThreshold(threshold, capped)
        capped.update(over)
        if len(capped) == len(sizes):
            raise SurgeonError("sparsity target cannot be met under the per-layer ceiling")


def global_mask(costs: Tensor, name: str, cut: GlobalThreshold) -> Tensor:
    """Keep-mask of one linear under a :func:`global_threshold` cut."""
    if name in cut.capped:
        return _keep_cheapest_removed(costs, cut.capped[name])
    # Ties at the threshold can overshoot by a handful of weights; that is within one element per tie.
    return costs > cut.value


def global_keep_masks(
    costs: dict[str, torch.Tensor], fraction: float, max_layer_fraction: float
) -> dict[str, torch.Tensor]:
    """Remove the cheapest ``fraction`` of all weights across layers, at most ``max_layer_fraction`` of
    any one (:func:`global_threshold` over costs held in memory)."""
    cut = global_threshold(lambda: costs.items(), {n: c.numel() for n, c in costs.items()}, fraction,
                           max_layer_fraction)
    return {n: global_mask(c, n, cut) for n, c in costs.items()}


def _order_keys(values: Tensor) -> Tensor:
    """Unsigned 32-bit keys ``[numel]`` (as int64) that sort as the float32 ``values`` do."""
    bits = values.detach().reshape(-1).to(torch.float32).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    # non-negative floats: set the sign bit, above every negative; negative ones: flip every bit
    return torch.where(bits >= 0x80000000, 0xFFFFFFFF - bits, bits | 0x80000000)


def kth_smallest(chunks: Callable[[], Iterable[Tensor]], k: int) -> float:
    """The ``k``-th smallest (1-based) float32 value of all ``chunks`` together, exactly what
    ``torch.cat(chunks).float().kthvalue(k)`` gives, with only one chunk in memory at a time.

    Radix selection on order-preserving 32-bit keys: one pass histograms the top 16 bits and finds
    the bin holding the k-th value, a second histograms the low 16 bits inside that bin.

    Example:
        >>> kth_smallest(lambda: [torch.tensor([3.0, -1.0]), torch.tensor([2.0, 0.5])], 3)
        2.0
    """
    bins = 1 << 16
    high = torch.zeros(bins, dtype=torch.int64)
    for c in chunks():
        high += torch.bincount(_order_keys(c) >> 16, minlength=bins)
    cum = high.cumsum(0)
    if not 1 <= k <= int(cum[-1]):
        raise ValueError(f"k={k} outside 1..{int(cum[-1])}")
    top = int(torch.searchsorted(cum, k))  # the first bin whose running count reaches k
    below = int(cum[top - 1]) if top > 0 else 0
    low = torch.zeros(bins, dtype=torch.int64)
    for c in chunks():
        keys = _order_keys(c)
        low += torch.bincount(keys[(keys >> 16) == top] & 0xFFFF, minlength=bins)
    key = (top << 16) | int(torch.searchsorted(low.cumsum(0), k - below))
    bits = key & 0x7FFFFFFF if key >= 0x80000000 else 0xFFFFFFFF - key
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _keep_cheapest_removed(costs: Tensor, count: int) -> Tensor:
    keep = torch.ones(costs.numel(), dtype=torch.bool)
    if count > 0:
        keep[costs.flatten().topk(count, largest=False).indices] = False
    return keep.view_as(costs)
