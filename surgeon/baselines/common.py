"""Shared pieces of the pruning baselines: the target type, input checks and score-to-mask rules.

Every baseline has the signature ``prune_<name>(W, A, n_tokens, target, **opts) -> (W_new,
keep_mask)`` so that one layer-wise driver can call any of them. A *target* is an unstructured
sparsity fraction in [0, 1) or an :class:`NMPattern`. Removal counts use the official codes'
rounding, ``int(count * fraction)`` (a floor: 60% of 576 inputs removes 345 per row, as
locuslab/wanda ``lib/prune.py`` does).
"""

from __future__ import annotations

from typing import Literal, TypeAlias

import torch

from base.errors import SurgeonError
from base.patterns import NMPattern, check_sparsity

Target: TypeAlias = float | NMPattern
Scope = Literal["matrix", "row"]


def check_layer(W: torch.Tensor, A: torch.Tensor | None = None, name: str = "weight", *,
                diagonal_ok: bool = False) -> None:
    """Raise :class:`SurgeonError` unless ``W`` is a finite float ``[d_out, d_in]`` matrix and ``A``
    (when given) a finite ``[d_in, d_in]`` matrix (or, ``diagonal_ok``, its ``[d_in]`` diagonal)."""
    if W.ndim != 2 or not W.is_floating_point():
        raise SurgeonError(f"{name}: expected a 2-D float weight, got {tuple(W.shape)} {W.dtype}")
    if not torch.isfinite(W).all():
        raise SurgeonError(f"{name}: weight has non-finite values")
    if A is not None:
        d_in = W.shape[1]
        if A.shape != (d_in, d_in) and not (diagonal_ok and A.shape == (d_in,)):
            raise SurgeonError(
                f"{name}: second moment is {tuple(A.shape)}, expected ({d_in}, {d_in})"
            )
        if not torch.isfinite(A).all():
            raise SurgeonError(f"{name}: second moment has non-finite values")


def check_target(target: Target, d_in: int, name: str = "weight") -> None:
    """Raise :class:`SurgeonError` unless ``target`` is a fraction in [0, 1) or an N:M pattern
    whose block divides ``d_in``."""
    if isinstance(target, NMPattern):
        target.check_shape(d_in, name)
    elif isinstance(target, (int, float)) and not isinstance(target, bool):
        check_sparsity(float(target))
    else:
        raise SurgeonError(
            f"{name}: target must be a sparsity fraction or an N:M pattern, got {target!r}"
        )


def n_removed(count: int, fraction: float) -> int:
    """Weights removed out of ``count``: ``int(count * fraction)``, the official codes' floor."""
    return int(count * fraction)


def mask_from_scores_per_row(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Keep-mask removing exactly ``int(d_in * fraction)`` lowest scores in every row.

    Ties go to the lower column index (stable sort), as in locuslab/wanda.

    Args:
        scores: ``[d_out, d_in]`` saliencies, higher means keep.
        fraction: sparsity in [0, 1).

    Example:
        >>> mask_from_scores_per_row(torch.tensor([[3.0, 1.0, 2.0, 4.0]]), 0.5)
        tensor([[ True, False, False,  True]])
    """
    k = n_removed(scores.shape[1], fraction)
    order = scores.sort(dim=1, stable=True).indices  # [d_out, d_in]
    return torch.ones_like(scores, dtype=torch.bool).scatter_(1, order[:, :k], False)


def mask_from_scores_matrix(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Keep-mask removing exactly ``int(numel * fraction)`` lowest scores of the whole matrix.

    The official magnitude code thresholds with ``score <= sorted[k]``, which removes one more
    weight (and all ties at the threshold); we remove exactly ``k``, ties to the lower flat index.

    Example:
        >>> mask_from_scores_matrix(torch.tensor([[3.0, 1.0], [2.0, 4.0]]), 0.5)
        tensor([[ True, False],
                [False,  True]])
    """
    k = n_removed(scores.numel(), fraction)
    order = scores.flatten().sort(stable=True).indices  # [d_out * d_in]
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    return keep.scatter_(0, order[:k], False).reshape(scores.shape)


def mask_for_target(scores: torch.Tensor, target: Target, scope: Scope) -> torch.Tensor:
    """Keep-mask for ``target`` from saliencies ``[d_out, d_in]``: N:M within blocks of each row,
    unstructured within each row (``scope="row"``) or over the whole matrix (``"matrix"``)."""
    if isinstance(target, NMPattern):
        return target.mask_from_scores(scores)
    if scope == "row":
        return mask_from_scores_per_row(scores, float(target))
    if scope == "matrix":
        return mask_from_scores_matrix(scores, float(target))
    raise SurgeonError(f"unknown scope {scope!r}: expected 'matrix' or 'row'")
