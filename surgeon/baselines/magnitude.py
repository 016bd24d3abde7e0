"""Magnitude pruning: remove the weights with the smallest ``|W_ij|``.

The classic baseline (e.g. Han et al. 2015, arXiv 1506.02626), as run by locuslab/wanda
``prune_magnitude``: unstructured over the whole matrix (default) or within each output row, and
N:M within every block of ``block`` consecutive inputs of a row. No calibration data is used and
the kept weights are not changed.
"""

from __future__ import annotations

import torch

from surgeon.baselines.common import (
    Scope,
    Target,
    check_layer,
    check_target,
    mask_for_target,
)


def prune_magnitude(
    W: torch.Tensor,
    A: torch.Tensor | None,
    n_tokens: int,
    target: Target,
    *,
    scope: Scope = "matrix",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the smallest-magnitude weights of one linear layer.

    Args:
        W: ``[d_out, d_in]`` weight, any float dtype.
        A: ignored (the shared baseline signature passes the inputs' second moment).
        n_tokens: ignored.
        target: sparsity fraction in [0, 1) or an :class:`NMPattern`.
        scope: for a fraction, rank over the whole ``"matrix"`` (removes exactly
            ``int(numel * fraction)``) or within each ``"row"`` (``int(d_in * fraction)`` per row).

    Returns:
        ``(W_new, keep_mask)``: ``W_new`` has ``W``'s dtype with removed weights exactly zero;
        ``keep_mask`` is bool ``[d_out, d_in]``, True where a weight is kept.

    Example:
        >>> W = torch.tensor([[1.0, -2.0, 3.0, -4.0], [5.0, -6.0, 7.0, -8.0]])
        >>> prune_magnitude(W, None, 0, 0.5)[1]
        tensor([[False, False, False, False],
                [ True,  True,  True,  True]])
    """
    check_layer(W)
    check_target(target, W.shape[1])
    keep = mask_for_target(W.abs(), target, scope)
    return W.masked_fill(~keep, 0), keep
