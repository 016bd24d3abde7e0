"""Second-order removal costs under a Kronecker-factored Fisher ``F = G ⊗ A``.

LLM Surgeon (van der Ouderaa et al., ICLR 2024, arXiv 2312.17244, Sec. 3-4): removing a set ``Q``
of weights ``θ = vec(W)`` (row-major) from a local optimum raises the loss, to second order, by

    ΔL = ½ θ_Qᵀ ([F⁻¹]_QQ)⁻¹ θ_Q,      F⁻¹ = G⁻¹ ⊗ A⁻¹.

The Kronecker structure makes this cheap for elements, rows (outputs) and columns (inputs); see
the costs table in ALGORITHMS.md. ``A``/``G`` are the damped factors and ``A_inv``/``G_inv``
their inverses, as returned by :func:`surgeon.curvature.kfac.prepare`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check(W: Tensor, d_out_mat: Tensor, d_in_mat: Tensor) -> None:
    d_out, d_in = W.shape
    assert d_out_mat.shape == (d_out, d_out), f"expected [{d_out}, {d_out}], got {tuple(d_out_mat.shape)}"
    assert d_in_mat.shape == (d_in, d_in), f"expected [{d_in}, {d_in}], got {tuple(d_in_mat.shape)}"


def _spd_solve(S: Tensor, B: Tensor) -> Tensor:
    """``S⁻¹ B`` for a symmetric positive definite ``S`` (a principal block of a damped inverse)."""
    L, info = torch.linalg.cholesky_ex(S)
    if int(info.max()) != 0:
        raise FloatingPointError("a principal block of an inverse factor is not positive definite")
    return torch.cholesky_solve(B, L)


def element_costs(W: Tensor, A_inv: Tensor, G_inv: Tensor) -> Tensor:
    """Cost of removing each weight alone: ``½ W_ij² / ([G⁻¹]_ii [A⁻¹]_jj)``.

    Args:
        W: ``[d_out, d_in]`` weight (float64 recommended).
        A_inv: ``[d_in, d_in]`` inverse of the damped input factor.
        G_inv: ``[d_out, d_out]`` inverse of the damped output-gradient factor.

    Returns:
        ``[d_out, d_in]`` costs, dtype of ``W``.

    Example:
        >>> element_costs(torch.tensor([[2.0]]), torch.tensor([[0.5]]), torch.tensor([[4.0]]))
        tensor([[1.]])
    """
    _check(W, G_inv, A_inv)
    return 0.5 * W**2 / torch.outer(G_inv.diagonal(), A_inv.diagonal())


def row_costs(W: Tensor, A: Tensor, G_inv: Tensor) -> Tensor:
    """Cost of removing each output row alone: ``½ w_r A w_rᵀ / [G⁻¹]_rr``.

    Args:
        W: ``[d_out, d_in]`` weight.
        A: ``[d_in, d_in]`` damped input factor.
        G_inv: ``[d_out, d_out]`` inverse of the damped output-gradient factor.

    Returns:
        ``[d_out]`` costs.

    Example:
        >>> row_costs(torch.tensor([[1.0, 1.0]]), torch.eye(2), torch.tensor([[0.5]]))
        tensor([2.])
    """
    _check(W, G_inv, A)
    return 0.5 * ((W @ A) * W).sum(1) / G_inv.diagonal()


def col_costs(W: Tensor, G: Tensor, A_inv: Tensor) -> Tensor:
    """Cost of removing each input column alone: ``½ w_cᵀ G w_c / [A⁻¹]_cc``.

    Args:
        W: ``[d_out, d_in]`` weight.
        G: ``[d_out, d_out]`` damped output-gradient factor.
        A_inv: ``[d_in, d_in]`` inverse of the damped input factor.

    Returns:
        ``[d_in]`` costs.

    Example:
        >>> col_costs(torch.tensor([[1.0], [1.0]]), torch.eye(2), torch.tensor([[0.5]]))
        tensor([2.])
    """
    _check(W, G, A_inv)
    return 0.5 * ((G @ W) * W).sum(0) / A_inv.diagonal()


def rows_cost(W: Tensor, A: Tensor, G_inv: Tensor, R: Tensor) -> Tensor:
    """Joint cost of removing the rows ``R`` together: ``½ tr(([G⁻¹]_RR)⁻¹ W_R A W_Rᵀ)``.

    Args:
        W: ``[d_out, d_in]`` weight.
        A: ``[d_in, d_in]`` damped input factor.
        G_inv: ``[d_out, d_out]`` inverse of the damped output-gradient factor.
        R: ``[k]`` long tensor of distinct row indices.

    Returns:
        0-dim tensor; for one row it equals :func:`row_costs` at that row.

    Example:
        >>> rows_cost(torch.ones(2, 2), torch.eye(2), torch.eye(2), torch.tensor([0, 1]))
        tensor(2.)
    """
    _check(W, G_inv, A)
    W_R = W[R]  # [k, d_in]
    S = _spd_solve(G_inv[R][:, R], W_R @ A @ W_R.T)  # ([G⁻¹]_RR)⁻¹ W_R A W_Rᵀ: [k, k]
    return 0.5 * S.trace()


def cols_cost(W: Tensor, G: Tensor, A_inv: Tensor, C: Tensor) -> Tensor:
    """Joint cost of removing the columns ``C`` together: ``½ tr(([A⁻¹]_CC)⁻¹ W_Cᵀ G W_C)``.

    Args:
        W: ``[d_out, d_in]`` weight.
        G: ``[d_out, d_out]`` damped output-gradient factor.
        A_inv: ``[d_in, d_in]`` inverse of the damped input factor.
        C: ``[k]`` long tensor of distinct column indices.

    Returns:
        0-dim tensor; for one column it equals :func:`col_costs` at that column.

    Example:
        >>> cols_cost(torch.ones(2, 2), torch.eye(2), torch.eye(2), torch.tensor([1]))
        tensor(1.)
    """
    _check(W, G, A_inv)
    W_C = W[:, C]  # [d_out, k]
    S = _spd_solve(A_inv[C][:, C], W_C.T @ G @ W_C)  # ([A⁻¹]_CC)⁻¹ W_Cᵀ G W_C: [k, k]
    return 0.5 * S.trace()


def elements_cost(W: Tensor, A_inv: Tensor, G_inv: Tensor, mask: Tensor) -> Tensor:
    """Exact joint cost of removing every weight where the keep-``mask`` is False.

    Solves the ``|Q| × |Q|`` system ``[F⁻¹]_QQ`` with entries ``[G⁻¹]_ik [A⁻¹]_jl``, so use it only
    for small ``|Q|`` (tests, or chunks of a few thousand weights).

    Args:
        W: ``[d_out, d_in]`` weight.
        A_inv: ``[d_in, d_in]``; G_inv: ``[d_out, d_out]`` inverses of the damped factors.
        mask: ``[d_out, d_in]`` bool keep-mask (True = kept, as in ``NMPattern.mask_from_scores``).

    Returns:
        0-dim tensor ``½ θ_Qᵀ ([F⁻¹]_QQ)⁻¹ θ_Q``.

    Example:
        >>> elements_cost(torch.tensor([[2.0, 1.0]]), torch.eye(2), torch.eye(1),
        ...               torch.tensor([[False, True]]))
        tensor(2.)
    """
    _check(W, G_inv, A_inv)
    rows, cols = (~mask).nonzero(as_tuple=True)  # Q in row-major order
    F_inv_QQ = G_inv[rows][:, rows] * A_inv[cols][:, cols]  # [|Q|, |Q|]
    theta = W[rows, cols]  # [|Q|]
    return 0.5 * theta @ _spd_solve(F_inv_QQ, theta[:, None])[:, 0]
