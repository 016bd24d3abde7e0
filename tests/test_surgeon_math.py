"""LLM Surgeon math against dense Optimal Brain Surgeon on the explicit Fisher F = G ⊗ A.

Every test builds a tiny float64 layer (d_out=5, d_in=6), forms ``F = kron(G, A)`` for the
row-major ``vec(W)`` and checks the Kronecker shortcuts against
``ΔL = ½ θ_Qᵀ([F⁻¹]_QQ)⁻¹θ_Q`` and ``Δθ = −F⁻¹ E_Q ([F⁻¹]_QQ)⁻¹ θ_Q`` solved densely.
"""

from __future__ import annotations

import itertools
import logging
from typing import NamedTuple

import pytest
import torch
from torch import Tensor

from base.errors import SurgeonError
from base.patterns import NMPattern
from surgeon.curvature.activations import gram
from surgeon.curvature.kfac import (
    GradSecondMoment,
    KronFactor,
    damp,
    inverse_spd,
    prepare,
    rescale,
)
from surgeon.prune.costs import (
    col_costs,
    cols_cost,
    element_costs,
    elements_cost,
    row_costs,
    rows_cost,
)
from surgeon.prune.threshold import (
    linear_schedule,
    per_layer_fraction_mask,
)
from surgeon.prune.update import (
    row_obs_updates,
    update_col,
    update_cols,
    update_element,
    update_elements_chunked,
    update_elements_exact,
    update_masked,
    update_masked_joint,
    update_row,
    update_rows,
)

D_OUT, D_IN = 5, 6
F64 = torch.float64


class Layer(NamedTuple):
    W: Tensor
    A: Tensor
    G: Tensor
    A_inv: Tensor
    G_inv: Tensor
    F: Tensor
    F_inv: Tensor


def make_layer(seed: int = 0, d_out: int = D_OUT, d_in: int = D_IN) -> Layer:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(3 * d_in, d_in, generator=gen, dtype=F64) + 0.5  # correlated, non-centred inputs
    Gr = torch.randn(3 * d_out, d_out, generator=gen, dtype=F64)
    A, G, A_inv, G_inv = prepare(X.T @ X / len(X), Gr.T @ Gr / len(Gr), lam_A=0.01, lam_G=0.05)
    F = torch.kron(G, A)  # row-major vec(W): F[(i,j),(k,l)] = G_ik A_jl
    W = torch.randn(d_out, d_in, generator=gen, dtype=F64)
    return Layer(W, A, G, A_inv, G_inv, F, torch.linalg.inv(F))


def dense_obs(W: Tensor, F_inv: Tensor, Q: Tensor) -> tuple[Tensor, Tensor]:
    """(ΔL, W + Δθ) for removing the flat indices Q, by a direct dense solve."""
    theta = W.flatten()
    v = torch.linalg.solve(F_inv[Q][:, Q], theta[Q])
    return 0.5 * theta[Q] @ v, (theta - F_inv[:, Q] @ v).view_as(W)


def quad_loss(F: Tensor, W_old: Tensor, W_new: Tensor) -> Tensor:
    delta = (W_new - W_old).flatten()
    return 0.5 * delta @ F @ delta


def flat_of(mask: Tensor) -> Tensor:
    return (~mask).flatten().nonzero()[:, 0]


def random_mask(seed: int, p_removed: float = 0.4, shape: tuple[int, int] = (D_OUT, D_IN)) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen) >= p_removed


# --- costs and updates of single structures --------------------------------------------------


def test_factorised_inverse_is_kron_of_inverses() -> None:
    L = make_layer()
    torch.testing.assert_close(L.F_inv, torch.kron(L.G_inv, L.A_inv))


def test_element_cost_and_update_match_dense_obs() -> None:
    L = make_layer(1)
    costs = element_costs(L.W, L.A_inv, L.G_inv)
    for i, j in itertools.product(range(D_OUT), range(D_IN)):
        cost, W_ref = dense_obs(L.W, L.F_inv, torch.tensor([i * D_IN + j]))
        W_new = update_element(L.W, L.A_inv, L.G_inv, i, j)
        torch.testing.assert_close(costs[i, j], cost)
        torch.testing.assert_close(W_new, W_ref)
        assert W_new[i, j] == 0.0
        torch.testing.assert_close(quad_loss(L.F, L.W, W_new), cost)


def test_single_row_and_column_match_dense_obs() -> None:
    L = make_layer(2)
    r_costs, c_costs = row_costs(L.W, L.A, L.G_inv), col_costs(L.W, L.G, L.A_inv)
    for r in range(D_OUT):
        cost, W_ref = dense_obs(L.W, L.F_inv, torch.arange(D_IN) + r * D_IN)
        W_new = update_row(L.W, L.G_inv, r)
        torch.testing.assert_close(r_costs[r], cost)
        torch.testing.assert_close(W_new, W_ref)
        assert (W_new[r] == 0).all()
        torch.testing.assert_close(quad_loss(L.F, L.W, W_new), cost)
    for c in range(D_IN):
        cost, W_ref = dense_obs(L.W, L.F_inv, torch.arange(D_OUT) * D_IN + c)
        W_new = update_col(L.W, L.A_inv, c)
        torch.testing.assert_close(c_costs[c], cost)
        torch.testing.assert_close(W_new, W_ref)
        assert (W_new[:, c] == 0).all()
        torch.testing.assert_close(quad_loss(L.F, L.W, W_new), cost)


@pytest.mark.parametrize("R", [[0, 3], [1, 2, 4]])
def test_joint_rows_match_dense_obs(R: list[int]) -> None:
    L = make_layer(3)
    Rt = torch.tensor(R)
    Q = (Rt[:, None] * D_IN + torch.arange(D_IN)).flatten()
    cost, W_ref = dense_obs(L.W, L.F_inv, Q)
    W_new = update_rows(L.W, L.G_inv, Rt)
    torch.testing.assert_close(rows_cost(L.W, L.A, L.G_inv, Rt), cost)
    torch.testing.assert_close(W_new, W_ref)
    assert (W_new[Rt] == 0).all()
    torch.testing.assert_close(quad_loss(L.F, L.W, W_new), cost)
    # the joint cost is not the sum of the single-row costs: rows interact through G
    assert not torch.isclose(cost, row_costs(L.W, L.A, L.G_inv)[Rt].sum())


@pytest.mark.parametrize("C", [[1, 2], [0, 3, 5]])
def test_joint_cols_match_dense_obs(C: list[int]) -> None:
    L = make_layer(4)
    Ct = torch.tensor(C)
    Q = (torch.arange(D_OUT)[:, None] * D_IN + Ct).flatten()
    cost, W_ref = dense_obs(L.W, L.F_inv, Q)
    W_new = update_cols(L.W, L.A_inv, Ct)
    torch.testing.assert_close(cols_cost(L.W, L.G, L.A_inv, Ct), cost)
    torch.testing.assert_close(W_new, W_ref)
    assert (W_new[:, Ct] == 0).all()
    torch.testing.assert_close(quad_loss(L.F, L.W, W_new), cost)
    assert not torch.isclose(cost, col_costs(L.W, L.G, L.A_inv)[Ct].sum())


# --- many elements: exact joint solve, per-row modes, chunks ----------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_update_elements_exact_matches_dense_obs(seed: int) -> None:
    L = make_layer(10 + seed)
    mask = random_mask(seed)
    cost, W_ref = dense_obs(L.W, L.F_inv, flat_of(mask))
    W_new = update_elements_exact(L.W, L.A_inv, L.G_inv, mask)
    torch.testing.assert_close(W_new, W_ref)
    assert (W_new[~mask] == 0).all()
    torch.testing.assert_close(elements_cost(L.W, L.A_inv, L.G_inv, mask), cost)
    torch.testing.assert_close(quad_loss(L.F, L.W, W_new), cost)


def test_update_elements_exact_refuses_large_sets() -> None:
    L = make_layer()
    with pytest.raises(ValueError, match="max_removed"):
        update_elements_exact(L.W, L.A_inv, L.G_inv, random_mask(0), max_removed=3)


def test_none_mode_is_layerwise_obs_on_the_single_touched_row() -> None:
    L = make_layer(5)
    mask = torch.ones(D_OUT, D_IN, dtype=torch.bool)
    mask[2, [0, 3, 4]] = False
    Q = torch.tensor([0, 3, 4])
    _, w_ref = dense_obs(L.W[2:3], L.A_inv, Q)  # OBS on row 2 alone, Hessian A (F = I ⊗ A)
    W_new = update_masked(L.W, L.A_inv, L.G_inv, mask, correlation="none")
    torch.testing.assert_close(W_new[2], w_ref[0])
    assert torch.equal(W_new[[0, 1, 3, 4]], L.W[[0, 1, 3, 4]])
    assert (W_new[2, Q] == 0).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_none_mode_is_exact_solve_with_identity_G(seed: int) -> None:
    L = make_layer(20 + seed)
    mask = random_mask(seed, 0.5)
    eye = torch.eye(D_OUT, dtype=F64)
    W_none = update_masked(L.W, L.A_inv, L.G_inv, mask, correlation="none")
    torch.testing.assert_close(W_none, update_elements_exact(L.W, L.A_inv, eye, mask))


def test_rows_mode_is_exact_when_one_row_has_removals() -> None:
    L = make_layer(6)
    mask = torch.ones(D_OUT, D_IN, dtype=torch.bool)
    mask[3, [1, 2, 5]] = False
    W_rows = update_masked(L.W, L.A_inv, L.G_inv, mask, correlation="rows")
    W_exact = update_elements_exact(L.W, L.A_inv, L.G_inv, mask)
    torch.testing.assert_close(W_rows, W_exact)
    assert not torch.allclose(W_rows[0], L.W[0])  # other rows do move, through G⁻¹


@pytest.mark.parametrize("seed", range(5))
def test_exact_solve_is_optimal_over_row_modes(seed: int) -> None:
    L = make_layer(30 + seed)
    mask = random_mask(100 + seed, 0.5)
    assert int((~mask).any(1).sum()) > 1
    W_exact = update_elements_exact(L.W, L.A_inv, L.G_inv, mask)
    W_rows = update_masked(L.W, L.A_inv, L.G_inv, mask, correlation="rows")
    W_none = update_masked(L.W, L.A_inv, L.G_inv, mask, correlation="none")
    loss = {name: quad_loss(L.F, L.W, Wn) for name, Wn in
            [("exact", W_exact), ("rows", W_rows), ("none", W_none)]}
    for Wn in (W_exact, W_rows, W_none):
        assert (Wn[~mask] == 0).all()
    assert loss["exact"] <= loss["rows"] * (1 + 1e-12)
    assert loss["exact"] <= loss["none"] * (1 + 1e-12)
    assert loss["exact"] < loss["none"]  # strictly: G couples the rows here


@pytest.mark.parametrize("seed", range(4))
def test_joint_masked_update_is_the_dense_obs_solve(seed: int) -> None:
    """Conjugate gradients on the masked K-FAC system land on the explicit |Q|x|Q| OBS solution."""
    L = make_layer(40 + seed, d_out=7, d_in=8)
    mask = random_mask(200 + seed, 0.5, (7, 8))
    _, W_ref = dense_obs(L.W, L.F_inv, flat_of(mask))
    W_joint, iters = update_masked_joint(L.W, L.A, L.G, mask, rtol=1e-12, max_iter=200)
    assert 0 < iters <= int(mask.sum()) + 5  # CG: about one step per unknown at most (exact arithmetic: exactly)
    assert (W_joint[~mask] == 0).all()
    torch.testing.assert_close(W_joint, torch.where(mask, W_ref, 0.0), atol=1e-9, rtol=1e-9)
    # through update_masked (float32, warm-started from the per-row solution): the same optimum
    W_rows = update_masked(L.W, L.A_inv, L.G_inv, mask, correlation="none")
    _, warm_iters = update_masked_joint(L.W, L.A, L.G, mask, start=W_rows, rtol=1e-12, max_iter=200)
    assert warm_iters <= iters
    W_fast = update_masked(L.W, L.A_inv, L.G_inv, mask, correlation="joint", A=L.A, G=L.G)
    assert W_fast.dtype == F64 and (W_fast[~mask] == 0).all()
    best = quad_loss(L.F, L.W, W_joint)
    assert best < quad_loss(L.F, L.W, W_rows)
    assert float(quad_loss(L.F, L.W, W_fast)) == pytest.approx(float(best), rel=1e-4)


def test_joint_masked_update_needs_the_factors() -> None:
    L = make_layer(3)
    with pytest.raises(ValueError, match="damped factors"):
        update_masked(L.W, L.A_inv, L.G_inv, random_mask(3), correlation="joint")


def test_row_obs_updates_batching_and_padding() -> None:
    L = make_layer(7, d_out=8, d_in=8)
    mask = random_mask(7, 0.5, (8, 8))
    mask[0] = True  # no removals
    mask[1] = False  # everything removed: u_1 = w_1 exactly
    mask[2, :7] = True
    mask[2, 7] = False  # a single removal
    U_one = row_obs_updates(L.W, L.A_inv, mask, max_block=1)  # one row per batch, no padding
    U_all = row_obs_updates(L.W, L.A_inv, mask)  # all rows in one padded batch
    torch.testing.assert_close(U_all, U_one)
    assert (U_all[0] == 0).all()
    torch.testing.assert_close(U_all[1], L.W[1])
    torch.testing.assert_close(U_all[2], L.W[2, 7] / L.A_inv[7, 7] * L.A_inv[7])


def test_nm_mask_update_keeps_pattern() -> None:
    L = make_layer(8, d_out=4, d_in=8)
    pattern = NMPattern(n_zero=2, block=4)
    mask = pattern.mask_from_scores(element_costs(L.W, L.A_inv, L.G_inv))
    for mode in ("rows", "none"):
        W_new = update_masked(L.W, L.A_inv, L.G_inv, mask, correlation=mode)  # type: ignore[arg-type]
        assert pattern.holds(W_new != 0)
        assert (W_new[~mask] == 0).all()


def test_chunked_update() -> None:
    L = make_layer(9)
    mask = random_mask(9, 0.5)
    n_removed = int((~mask).sum())
    W_exact = update_elements_exact(L.W, L.A_inv, L.G_inv, mask)
    torch.testing.assert_close(update_elements_chunked(L.W, L.A_inv, L.G_inv, mask, chunk=n_removed), W_exact)
    W_chunked = update_elements_chunked(L.W, L.A_inv, L.G_inv, mask, chunk=4)
    assert (W_chunked[~mask] == 0).all()
    assert quad_loss(L.F, L.W, W_exact) <= quad_loss(L.F, L.W, W_chunked) * (1 + 1e-12)
    assert quad_loss(L.F, L.W, W_chunked) < quad_loss(L.F, L.W, torch.where(mask, L.W, 0.0))


# --- Kronecker factors ------------------------------------------------------------------------


def test_rescale_keeps_kron_and_equalises_norms() -> None:
    L = make_layer()
    A2, G2 = rescale(L.A * 1e3, L.G * 1e-2)
    torch.testing.assert_close(torch.kron(G2, A2), torch.kron(L.G * 1e-2, L.A * 1e3))
    torch.testing.assert_close(A2.norm(), G2.norm())


def test_damp_adds_relative_diagonal() -> None:
    M = torch.tensor([[2.0, 1.0], [1.0, 6.0]], dtype=F64)
    torch.testing.assert_close(damp(M, 0.5), M + 0.5 * 4.0 * torch.eye(2, dtype=F64))


def test_damp_and_inverse_equal_the_plain_formulas_bit_for_bit() -> None:
    """damp raises a copy's diagonal and inverse_spd symmetrises with one temporary: the same bits as
    ``M + lam·mean(diag)·I`` and ``(M + Mᵀ) / 2`` (the copies they replaced)."""
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(300, 64, generator=gen, dtype=F64)
    M = X.T @ X / 300 + 1e-9 * torch.randn(64, 64, generator=gen, dtype=F64)  # not exactly symmetric
    for lam in (0.0, 0.01, 0.37):
        assert torch.equal(damp(M, lam), M + lam * M.diagonal().mean() * torch.eye(64, dtype=F64))
    S = (M + M.T) / 2
    M_inv, lam = inverse_spd(M, 0.01)
    assert lam == 0.01
    assert torch.equal(M_inv, torch.cholesky_inverse(torch.linalg.cholesky(S + 0.01 * S.diagonal().mean() * torch.eye(64, dtype=F64))))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_all_finite(dtype: torch.dtype) -> None:
    from base.integrity import all_finite

    t = torch.randn(5, 7).to(dtype)
    assert all_finite(t) and all_finite(t[:0]) and all_finite(torch.arange(4))
    for bad in (float("nan"), float("inf"), float("-inf")):
        u = t.clone()
        u[3, 2] = bad
        assert not all_finite(u), (dtype, bad)
        assert not all_finite(u.T)  # any layout


def test_inverse_spd_retries_singular_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    v = torch.arange(1.0, 5.0, dtype=F64)
    M = torch.outer(v, v)  # rank one: Cholesky fails without damping
    with caplog.at_level(logging.WARNING, logger="surgeon.curvature.kfac"):
        M_inv, lam = inverse_spd(M, lam=0.0)
    assert lam > 0
    assert "Cholesky failed" in caplog.text
    torch.testing.assert_close(M_inv @ damp(M, lam), torch.eye(4, dtype=F64))
    with pytest.raises(FloatingPointError):
        inverse_spd(M, lam=0.0, max_tries=1)
    with pytest.raises(FloatingPointError):
        inverse_spd(torch.full((2, 2), float("nan")), lam=0.01)


def test_prepare_returns_matching_inverses() -> None:
    L = make_layer()
    torch.testing.assert_close(L.A @ L.A_inv, torch.eye(D_IN, dtype=F64))
    torch.testing.assert_close(L.G @ L.G_inv, torch.eye(D_OUT, dtype=F64))
    torch.testing.assert_close(L.A.norm(), L.G.norm(), rtol=0.1, atol=0)  # rescaled, then damped


def test_grad_second_moment_and_kron_factor() -> None:
    g = torch.randn(2, 7, 3, generator=torch.Generator().manual_seed(0))
    acc = GradSecondMoment(3)
    acc.update(g[0])
    acc.update(g[1])
    flat = g.reshape(-1, 3).to(F64)
    torch.testing.assert_close(acc.finalize(), flat.T @ flat / 14)
    with pytest.raises(ValueError):
        KronFactor(A=torch.eye(3), G=torch.ones(2, 3))



@pytest.mark.parametrize("d", [5, 255, 256, 577, 1536])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_gram_equals_the_full_product(d: int, dtype: torch.dtype) -> None:
    x = torch.randn(300, d, generator=torch.Generator().manual_seed(d), dtype=dtype)
    g = gram(x)
    exact = x.to(F64).T @ x.to(F64)  # the reference in float64, against the float32 product's own rounding
    torch.testing.assert_close(g.to(F64), exact, **({"rtol": 2e-6, "atol": 1e-4} if dtype == torch.float32 else {}))
    torch.testing.assert_close(g, x.T @ x, rtol=1e-6, atol=1e-5 if dtype == torch.float32 else 1e-12)

# --- allocation ------------------------------------------------------------------------------


def test_linear_schedule() -> None:
    assert linear_schedule(0.7, 3) == pytest.approx([0.9, 0.8, 0.7])
    assert linear_schedule(0.5, 1) == [0.5]
    assert linear_schedule(0.6, 2, start=0.8) == pytest.approx([0.7, 0.6])
    with pytest.raises(SurgeonError):
        linear_schedule(0.7, 0)
    with pytest.raises(SurgeonError):
        linear_schedule(1.2, 3)


def test_nm_mask_matches_brute_force() -> None:
    pattern = NMPattern(n_zero=2, block=4)
    costs = torch.rand(6, 12, generator=torch.Generator().manual_seed(3), dtype=F64)
    keep = pattern.mask_from_scores(costs)
    for r, b in itertools.product(range(6), range(3)):
        block = costs[r, 4 * b : 4 * b + 4]
        best = max(itertools.combinations(range(4), 2), key=lambda kept: float(block[list(kept)].sum()))
        expect = torch.zeros(4, dtype=torch.bool)
        expect[list(best)] = True
        assert torch.equal(keep[r, 4 * b : 4 * b + 4], expect)


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 0.9])
def test_per_layer_fraction_mask(fraction: float) -> None:
    costs = torch.rand(7, 9, generator=torch.Generator().manual_seed(4))
    keep = per_layer_fraction_mask(costs, fraction)
    n_removed = round(fraction * 63)
    assert int((~keep).sum()) == n_removed
    if 0 < n_removed < 63:
        assert costs[~keep].max() <= costs[keep].min()
    with pytest.raises(SurgeonError):
        per_layer_fraction_mask(costs, 1.0)


def test_lazy_damped_factors_equal_prepare_and_keep_few() -> None:
    from surgeon.curvature.kfac import KronFactor, LazyDamped

    layers = {f"l{i}": make_layer(60 + i) for i in range(5)}
    raw = {n: KronFactor(L.A * (1 + i), L.G / (1 + i)) for i, (n, L) in enumerate(layers.items())}
    lazy = LazyDamped(raw, 0.01, 0.1, cache=2)
    assert list(lazy) == list(raw) and len(lazy) == 5
    for n, f in raw.items():
        for got, want in zip(lazy[n], prepare(f.A, f.G, 0.01, 0.1), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert len(lazy._cache) == 2 and list(lazy._cache) == ["l3", "l4"]
    assert lazy["l4"] is lazy["l4"]  # cached: the same tensors, not recomputed


def test_lazy_damped_recomputes_with_the_damping_that_worked(caplog: pytest.LogCaptureFixture) -> None:
    """A factor that needs more damping than asked is factorised with it again after eviction:
    the same tensors, and its Cholesky warnings logged once, not at every recomputation."""
    import logging

    from surgeon.curvature.kfac import KronFactor, LazyDamped

    bad = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64)  # eigenvalues 3 and -1: needs damping
    good = make_layer(7)
    raw = {"bad": KronFactor(bad, torch.eye(3, dtype=torch.float64)), "good": KronFactor(good.A, good.G)}
    lazy = LazyDamped(raw, 0.01, 0.01, cache=1)
    with caplog.at_level(logging.WARNING, logger="surgeon.curvature.kfac"):
        first = lazy["bad"]
        warnings = len(caplog.records)
        lazy["good"]  # evicts "bad"
        again = lazy["bad"]
    assert warnings >= 2 and len(caplog.records) == warnings
    assert again is not first and all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    assert bool((torch.linalg.eigvalsh(first.A) > 0).all())
