"""Wanda: pruning by weights and activations (Sun et al. 2023, arXiv 2306.11695).

Each weight scores ``S_ij = |W_ij| · ‖x_j‖₂`` (paper eq. 1), where ``‖x_j‖₂`` is the norm of
input feature j over all N calibration tokens, ``‖x_j‖₂ = sqrt(N · A_jj)`` with ``A`` the mean
second moment. Scores are compared within each output row (paper section 3, "comparison group"),
as locuslab/wanda ``lib/prune.py`` does: unstructured removes exactly ``int(d_in · sparsity)``
weights per row, N:M the ``n_zero`` lowest in every block of a row. No weight update.
"""

from __future__ import annotations

import torch

from base.errors import SurgeonError
from surgeon.baselines.common import Target, check_layer, check_target, mask_for_target


def wanda_scores(W: torch.Tensor, A: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Saliency ``|W_ij| · ‖x_j‖₂`` as float64 ``[d_out, d_in]``, from ``W`` and ``diag(A)`` (``A`` may be the diagonal).

    Example:
        >>> wanda_scores(torch.tensor([[1.0, -2.0]]), torch.diag(torch.tensor([4.0, 1.0])), 1)
        tensor([[2., 2.]], dtype=torch.float64)
    """
    # A_jj >= 0 for a second moment; clamp guards against a rounding-negative diagonal under sqrt.
    diag = A if A.ndim == 1 else A.diagonal()
    x_norm = (n_tokens * diag.to(torch.float64)).clamp_min(0).sqrt()  # [d_in]
    return W.to(torch.float64).abs() * x_norm  # [d_out, d_in]


def prune_wanda(
    W: torch.Tensor, A: torch.Tensor, n_tokens: int, target: Target
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the weights with the lowest Wanda score within each output row.

    Args:
        W: ``[d_out, d_in]`` weight, any float dtype.
        A: ``[d_in, d_in]`` mean second moment of the layer's inputs (float64); only its
            diagonal is used, and may be given alone, ``[d_in]``
            (:class:`~surgeon.curvature.activations.SecondMoment` with ``diagonal=True``).
        n_tokens: number of calibration tokens behind ``A`` (scales every score alike).
        target: sparsity fraction in [0, 1) or an :class:`NMPattern`.

    Returns:
        ``(W_new, keep_mask)``: ``W_new`` has ``W``'s dtype with removed weights exactly zero;
        ``keep_mask`` is bool ``[d_out, d_in]``, True where a weight is kept.

    Example:
        >>> W = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
        >>> A = torch.diag(torch.tensor([1.0, 1.0, 100.0, 100.0], dtype=torch.float64))
        >>> prune_wanda(W, A, 1, 0.5)[1]
        tensor([[False, False,  True,  True]])
    """
    check_layer(W, A, diagonal_ok=True)
    check_target(target, W.shape[1])
    if n_tokens <= 0:
        raise SurgeonError(f"Wanda needs calibration tokens, got n_tokens={n_tokens}")
    keep = mask_for_target(wanda_scores(W, A, n_tokens), target, "row")
    return W.masked_fill(~keep, 0), keep
