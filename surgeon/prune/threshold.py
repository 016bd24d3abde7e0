"""Turn removal costs into masks: global allocation, N:M and per-layer fractions, shot schedule.

LLM Surgeon (van der Ouderaa et al., ICLR 2024, arXiv 2312.17244, Sec. 4-5): every cost estimates
the same loss increase ``ΔL = ½ θ_Qᵀ ([F⁻¹]_QQ)⁻¹ θ_Q``, so costs compare across layers. Sorting all
candidates of the model and removing the cheapest until the shot's target size is reached lets
layers end up with different sizes (a per-layer floor keeps any layer from vanishing). Shots
follow a linear schedule of remaining size, e.g. 100% -> 70% in T steps.
"""

from __future__ import annotations

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


def global_keep_masks(
    costs: dict[str, torch.Tensor], fraction: float, max_layer_fraction: float
) -> dict[str, torch.Tensor]:
    """Remove the cheapest ``fraction`` of all weights across layers, at most ``max_layer_fraction`` of any one.

    Costs are comparable across layers (all estimate the same loss increase). Layers that would
    exceed the ceiling are capped at it, and their excess is re-allocated to the others by
    repeating the threshold search over the remaining layers.
    """
    total = sum(c.numel() for c in costs.values())
    budget = round(fraction * total)
    capped: dict[str, int] = {}
    while True:
        free = {n: c for n, c in costs.items() if n not in capped}
        need = budget - sum(capped.values())
        flat = torch.cat([c.flatten().float() for c in free.values()])
        if need <= 0:
            threshold = -float("inf")
        else:
            threshold = float(flat.kthvalue(min(need, flat.numel())).values)
        over = {
            n: int(max_layer_fraction * c.numel())
            for n, c in free.items()
            if int((c <= threshold).sum()) > int(max_layer_fraction * c.numel())
        }
        if not over:
            break
        capped.update(over)
        if len(capped) == len(costs):
            raise SurgeonError("sparsity target cannot be met under the per-layer ceiling")
    masks: dict[str, torch.Tensor] = {}
    for n, c in costs.items():
        if n in capped:
            masks[n] = _keep_cheapest_removed(c, capped[n])
        else:
            masks[n] = c > threshold
    # Ties at the threshold can overshoot by a handful of weights; that is within one element per tie.
    return masks


def _keep_cheapest_removed(costs: Tensor, count: int) -> Tensor:
    keep = torch.ones(costs.numel(), dtype=torch.bool)
    if count > 0:
        keep[costs.flatten().topk(count, largest=False).indices] = False
    return keep.view_as(costs)
