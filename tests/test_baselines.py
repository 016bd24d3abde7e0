"""Tests for the baselines: magnitude, Wanda (arXiv 2306.11695) and SparseGPT (arXiv 2301.00774).

Known answers on hand-made matrices, brute force for N:M masks, the exact OBS solution for
SparseGPT, and agreement with a test-only transcription of IST-DASLab ``fasterprune``.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

import pytest
import torch

from base.errors import SurgeonError
from base.patterns import NMPattern
from surgeon.baselines.common import (
    Target,
    mask_from_scores_matrix,
    mask_from_scores_per_row,
)
from surgeon.baselines.magnitude import prune_magnitude
from surgeon.baselines.sparsegpt import (
    MaskRule,
    inverse_hessian_factor,
    prune_sparsegpt,
)
from surgeon.baselines.wanda import prune_wanda, wanda_scores
from surgeon.curvature.activations import SecondMoment

Pruner = Callable[..., tuple[torch.Tensor, torch.Tensor]]
PRUNERS: dict[str, Pruner] = {
    "magnitude": prune_magnitude, "wanda": prune_wanda, "sparsegpt": prune_sparsegpt,
}
F64 = torch.float64


def correlated_layer(
    d_out: int, d_in: int, n: int = 2048, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random weight and the second moment of correlated inputs with uneven feature scales."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(d_in, dtype=F64) + torch.randn(d_in, d_in, generator=g, dtype=F64) / d_in**0.5
    scale = torch.randn(d_in, generator=g, dtype=F64).exp()  # log-normal norms, as in LLMs
    X = torch.randn(n, d_in, generator=g, dtype=F64) @ mix * scale  # [n, d_in]
    W = torch.randn(d_out, d_in, generator=g, dtype=F64)
    return W, X.T @ X / n


def recon_error(W: torch.Tensor, W_hat: torch.Tensor, A: torch.Tensor) -> float:
    """Layer reconstruction error ``tr((W - Ŵ) A (W - Ŵ)ᵀ)`` = mean ``‖(W - Ŵ) x‖²``."""
    D = (W - W_hat).to(F64)  # [d_out, d_in]
    return float(torch.einsum("oi,ij,oj->", D, A, D))


def reference_fasterprune(
    W: torch.Tensor, H: torch.Tensor, sparsity: float, prunen: int = 0, prunem: int = 0,
    blocksize: int = 128, percdamp: float = 0.01,
) -> torch.Tensor:
    """IST-DASLab ``SparseGPT.fasterprune`` transcribed (float64, no quantizer, no logging)."""
    W, H = W.clone(), H.clone()
    rows, columns = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1) == 1
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i : (i + prunem)] ** 2 / (
                    torch.diag(Hinv1)[i : (i + prunem)].reshape((1, -1))
                ) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


# --- known answers -------------------------------------------------------------------------------


def test_magnitude_known_answer_matrix_and_row_scope() -> None:
    W = torch.tensor([[1.0, -2.0, 3.0, -4.0], [5.0, -6.0, 7.0, -8.0]], dtype=F64)
    W_new, keep = prune_magnitude(W, None, 0, 0.5)  # whole matrix: the four largest |W| are row 1
    assert keep.tolist() == [[False] * 4, [True] * 4]
    assert W_new.tolist() == [[0.0] * 4, [5.0, -6.0, 7.0, -8.0]]
    _, keep_row = prune_magnitude(W, None, 0, 0.5, scope="row")  # per row: the two largest of each
    assert keep_row.tolist() == [[False, False, True, True]] * 2
    _, keep_24 = prune_magnitude(W.flip(1), None, 0, NMPattern(2, 4))
    assert keep_24.tolist() == [[True, True, False, False]] * 2


def test_magnitude_known_answer_eight_weights() -> None:
    W = torch.tensor([[4.0, 8.0, 1.0, 6.0, 3.0, 7.0, 2.0, 5.0]], dtype=F64)  # 1..8, shuffled
    _, keep = prune_magnitude(W, None, 0, 0.75)  # int(8 * 0.75) = 6 removed: keep 7 and 8
    assert W[keep].tolist() == [8.0, 7.0]
    _, keep = prune_magnitude(W, None, 0, 0.6)  # int(4.8) = 4 removed: keep 5..8
    assert sorted(W[keep].tolist()) == [5.0, 6.0, 7.0, 8.0]


def test_wanda_known_answer_differs_from_magnitude_and_from_whole_matrix() -> None:
    W = torch.tensor([[4.0, 3.0, 2.0, 1.0], [0.01, 0.02, 0.03, 0.04]], dtype=F64)
    x_norm = torch.tensor([1.0, 1.0, 10.0, 10.0], dtype=F64)
    n_tokens = 4
    A = torch.diag(x_norm**2 / n_tokens)  # ‖x_j‖ = sqrt(n · A_jj)
    scores = wanda_scores(W, A, n_tokens)
    expected = torch.tensor([[4.0, 3.0, 20.0, 10.0], [0.01, 0.02, 0.3, 0.4]], dtype=F64)
    assert torch.allclose(scores, expected)
    W_new, keep = prune_wanda(W, A, n_tokens, 0.5)
    assert keep.tolist() == [[False, False, True, True]] * 2
    assert W_new.tolist() == [[0.0, 0.0, 2.0, 1.0], [0.0, 0.0, 0.03, 0.04]]
    # Magnitude keeps the other half of row 0; a whole-matrix Wanda comparison empties row 1.
    _, keep_magnitude = prune_magnitude(W, A, n_tokens, 0.5, scope="row")
    assert keep_magnitude[0].tolist() == [True, True, False, False]
    assert mask_from_scores_matrix(scores, 0.5).tolist() == [[True] * 4, [False] * 4]


def test_per_row_rounding_is_the_official_floor() -> None:
    scores = torch.arange(576.0).repeat(3, 1)
    assert (~mask_from_scores_per_row(scores, 0.6)).sum(1).tolist() == [345] * 3  # int(345.6)


# --- N:M masks -----------------------------------------------------------------------------------


def brute_force_nm(scores: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """Keep-mask maximising the kept score in every block, by enumerating all keep-sets."""
    d_out, d_in = scores.shape
    keep = torch.zeros(d_out, d_in, dtype=torch.bool)
    n_keep = pattern.block - pattern.n_zero
    for r in range(d_out):
        for b in range(0, d_in, pattern.block):
            best = max(itertools.combinations(range(pattern.block), n_keep),
                       key=lambda s: sum(float(scores[r, b + j]) for j in s))
            keep[r, [b + j for j in best]] = True
    return keep


@pytest.mark.parametrize("pattern", [NMPattern(2, 4), NMPattern(1, 4), NMPattern(4, 8)])
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_nm_mask_matches_brute_force(method: str, pattern: NMPattern) -> None:
    W, A = correlated_layer(6, 32, seed=1)
    _, keep = PRUNERS[method](W, A, 100, pattern)
    scores = W.abs() if method == "magnitude" else wanda_scores(W, A, 100)
    assert torch.equal(keep, brute_force_nm(scores, pattern))


@pytest.mark.parametrize("pattern", [NMPattern(2, 4), NMPattern(4, 8)])
@pytest.mark.parametrize("method", list(PRUNERS))
def test_nm_pattern_holds_and_removed_are_zero(method: str, pattern: NMPattern) -> None:
    W, A = correlated_layer(16, 256, seed=2)
    W_new, keep = PRUNERS[method](W, A, 2048, pattern)
    assert pattern.holds(keep) and pattern.holds(W_new != 0)
    zeros_per_block = (~keep).reshape(16, -1, pattern.block).sum(-1)
    assert (zeros_per_block == pattern.n_zero).all()
    assert (W_new[~keep] == 0).all()
    assert W_new.dtype == W.dtype


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.6, 0.9])
def test_unstructured_counts_hit_the_target(sparsity: float) -> None:
    d_out, d_in = 24, 320  # 320 = 128 + 128 + 64: SparseGPT's last block is short
    W, A = correlated_layer(d_out, d_in, seed=3)
    W_mat, keep = prune_magnitude(W, A, 1, sparsity)
    assert (~keep).sum() == int(d_out * d_in * sparsity) and (W_mat[~keep] == 0).all()
    _, keep = prune_magnitude(W, A, 1, sparsity, scope="row")
    assert ((~keep).sum(1) == int(d_in * sparsity)).all()
    W_wanda, keep = prune_wanda(W, A, 1, sparsity)
    assert ((~keep).sum(1) == int(d_in * sparsity)).all() and (W_wanda[~keep] == 0).all()
    rules: tuple[tuple[MaskRule, int], ...] = (("official", 1), ("exact", 0))
    for rule, extra in rules:  # the official threshold "<= sorted[k]" removes k + 1
        W_sgpt, keep = prune_sparsegpt(W, A, 1, sparsity, mask_rule=rule)
        assert (W_sgpt[~keep] == 0).all()
        for i1 in range(0, d_in, 128):
            block = ~keep[:, i1 : i1 + 128]
            expected = int(block.numel() * sparsity) + (extra if sparsity > 0 else 0)
            assert int(block.sum()) == expected


# --- SparseGPT -----------------------------------------------------------------------------------


def damped(A: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    return A + percdamp * A.diagonal().mean() * torch.eye(A.shape[0], dtype=A.dtype)


def test_sparsegpt_first_column_is_the_exact_obs_update() -> None:
    W, A = correlated_layer(8, 40, seed=4)
    keep = torch.ones_like(W, dtype=torch.bool)
    keep[:, 0] = False
    W_new, _ = prune_sparsegpt(W, A, 1, 0.0, keep_mask=keep)
    H_inv = torch.linalg.inv(damped(A))
    obs = W - torch.outer(W[:, 0], H_inv[0]) / H_inv[0, 0]  # ΔW = −W[:, q] H⁻¹[q, :] / H⁻¹[q, q]
    assert torch.allclose(W_new, obs, atol=1e-12, rtol=0)
    assert (W_new[:, 0] == 0).all()


def test_sparsegpt_last_column_cannot_be_compensated() -> None:
    # Columns are visited left to right and errors flow only to later columns: removing the last
    # column zeroes it and leaves the others, unlike the OBS update (which changes them).
    W, A = correlated_layer(8, 40, seed=4)
    keep = torch.ones_like(W, dtype=torch.bool)
    keep[:, -1] = False
    W_new, _ = prune_sparsegpt(W, A, 1, 0.0, keep_mask=keep)
    assert torch.allclose(W_new, W * keep, atol=1e-12, rtol=0)
    H_inv = torch.linalg.inv(damped(A))
    obs = W - torch.outer(W[:, -1], H_inv[-1]) / H_inv[-1, -1]
    assert recon_error(W, obs, damped(A)) < recon_error(W, W_new, damped(A))


def test_sparsegpt_removing_leading_columns_is_the_least_squares_optimum() -> None:
    # Removing a prefix R of the columns (across a block boundary, so the lazy update is used) is
    # sequential exact OBS: Ŵ_S = W_S + W_R H_RS H_SS⁻¹, the optimum of tr(ΔW H ΔWᵀ) given Ŵ_R = 0.
    W, A = correlated_layer(8, 96, seed=5)
    keep = torch.ones_like(W, dtype=torch.bool)
    keep[:, :50] = False
    W_new, _ = prune_sparsegpt(W, A, 1, 0.0, keep_mask=keep, blocksize=32)
    H = damped(A)
    R, S = slice(0, 50), slice(50, 96)
    optimum = torch.zeros_like(W)
    optimum[:, S] = W[:, S] + W[:, R] @ H[R, S] @ torch.linalg.inv(H[S, S])
    assert torch.allclose(W_new, optimum, atol=1e-10, rtol=0)


@pytest.mark.parametrize("target", [0.5, NMPattern(2, 4)], ids=str)
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(target: Target) -> None:
    W, A = correlated_layer(32, 128, seed=6)
    errors = {name: recon_error(W, f(W, A, 2048, target)[0], A) for name, f in PRUNERS.items()}
    assert errors["sparsegpt"] < 0.9 * errors["wanda"] < 0.9 * errors["magnitude"]


@pytest.mark.parametrize("target", [0.5, 0.6, NMPattern(2, 4), NMPattern(4, 8)], ids=str)
def test_sparsegpt_matches_official_structure(target: Target) -> None:
    W, A = correlated_layer(16, 256, seed=7)
    if isinstance(target, NMPattern):
        ref = reference_fasterprune(W, A, 0.0, target.n_zero, target.block)
    else:
        ref = reference_fasterprune(W, A, target)
    W_new, keep = prune_sparsegpt(W, A, 2048, target, blocksize=128, percdamp=0.01)
    assert torch.equal(keep, ref != 0)
    assert (W_new - ref).abs().max() < 1e-10


def test_sparsegpt_dead_inputs() -> None:
    W, A = correlated_layer(16, 256, seed=8)
    dead = torch.tensor([3, 100, 200])
    A[dead, :] = 0
    A[:, dead] = 0
    for target in (0.5, NMPattern(2, 4)):
        nm = (target.n_zero, target.block) if isinstance(target, NMPattern) else (0, 0)
        ref = reference_fasterprune(W, A, 0.5 if nm == (0, 0) else 0.0, *nm)
        W_new, _ = prune_sparsegpt(W, A, 2048, target)
        assert torch.isfinite(W_new).all() and (W_new[:, dead] == 0).all()
        assert (W_new - ref).abs().max() < 1e-10


def test_sparsegpt_float32_sweep_stays_close_to_float64() -> None:
    W, A = correlated_layer(32, 256, seed=9)
    W64, _ = prune_sparsegpt(W, A, 1, NMPattern(2, 4))
    W32, keep = prune_sparsegpt(W.float(), A, 1, NMPattern(2, 4))
    assert W32.dtype == torch.float32 and (W32[~keep] == 0).all()
    assert recon_error(W, W32.double(), A) < 1.001 * recon_error(W, W64, A)


def test_sparsegpt_raises_damping_when_cholesky_fails(caplog: pytest.LogCaptureFixture) -> None:
    A = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.5], dtype=F64))  # indefinite, mean diag 0.625
    W = torch.ones(2, 4, dtype=F64)
    with caplog.at_level(logging.WARNING, logger="surgeon.baselines.sparsegpt"):
        W_new, keep = prune_sparsegpt(W, A, 1, NMPattern(2, 4))
    retries = [r for r in caplog.records if "Cholesky" in r.message]
    assert len(retries) == 2  # damping 0.01 -> 0.1 -> 1, which works
    assert torch.isfinite(W_new).all() and NMPattern(2, 4).holds(keep)
    with pytest.raises(SurgeonError, match="not positive definite"):
        prune_sparsegpt(W, -torch.eye(4, dtype=F64), 1, 0.5)


def test_inverse_hessian_factor_is_the_flipped_cholesky_inverse_bit_for_bit() -> None:
    """The low-memory factorisation (damping on the flipped copy's diagonal, K⁻¹ solved in place)
    gives exactly what the plain formula ``J chol(J (H + λ mean(diag H) I) J)⁻¹ J`` gives."""
    _, A = correlated_layer(4, 96, seed=12)
    eye = torch.eye(96, dtype=F64)
    K = torch.linalg.cholesky((A + 0.01 * A.diagonal().mean() * eye).flip(0, 1))
    expected = torch.linalg.solve_triangular(K, eye, upper=False).flip(0, 1)
    U = inverse_hessian_factor(A, 0.01)
    assert U.is_contiguous() and torch.equal(U, expected)
    assert torch.allclose(U.T @ U @ (A + 0.01 * A.diagonal().mean() * eye), eye, atol=1e-8)


def test_wanda_takes_the_diagonal_alone() -> None:
    """Wanda reads only diag(A): the ``[d_in]`` diagonal gives the same mask and weights as the matrix,
    and the diagonal accumulator equals the matrix accumulator's diagonal."""
    W, A = correlated_layer(16, 64, seed=13)
    for target in (0.5, NMPattern(2, 4)):
        full, diag = prune_wanda(W, A, 100, target), prune_wanda(W, A.diagonal().clone(), 100, target)
        assert torch.equal(full[0], diag[0]) and torch.equal(full[1], diag[1])
    with pytest.raises(SurgeonError, match="second moment"):
        prune_wanda(W, A.diagonal()[:32].clone(), 100, 0.5)
    with pytest.raises(SurgeonError, match="second moment"):  # SparseGPT needs the matrix
        prune_sparsegpt(W, A.diagonal().clone(), 100, 0.5)
    x = torch.randn(3, 50, 64, generator=torch.Generator().manual_seed(14))
    matrix, diagonal = SecondMoment(64), SecondMoment(64, diagonal=True)
    for batch in x:
        matrix.update(batch)
        diagonal.update(batch)
    assert diagonal.finalize().shape == (64,)
    torch.testing.assert_close(diagonal.finalize(), matrix.finalize().diagonal(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method", list(PRUNERS))
def test_dtype_kept_and_input_untouched(method: str, dtype: torch.dtype) -> None:
    W, A = correlated_layer(8, 64, seed=10)
    W = W.to(dtype).T.contiguous().T  # column-major: W.T is contiguous, a tempting in-place view
    W_before, A_before = W.clone(), A.clone()
    W_new, keep = PRUNERS[method](W, A, 2048, 0.5)
    assert W_new.dtype == dtype and keep.dtype == torch.bool
    assert torch.equal(W, W_before) and torch.equal(A, A_before)  # SparseGPT factorises A itself, not a copy
    assert (W_new[~keep] == 0).all() and torch.isfinite(W_new).all()


# --- input validation ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(PRUNERS))
def test_invalid_targets_raise(method: str) -> None:
    W, A = correlated_layer(4, 6)
    with pytest.raises(SurgeonError, match="6 input columns are not a multiple of the 2:4 block size 4"):
        PRUNERS[method](W, A, 10, NMPattern(2, 4))
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(SurgeonError, match="sparsity"):
            PRUNERS[method](W, A, 10, bad)


def test_invalid_inputs_raise() -> None:
    W, A = correlated_layer(4, 8)
    with pytest.raises(SurgeonError, match="second moment"):
        prune_wanda(W, A[:4, :4], 10, 0.5)
    with pytest.raises(SurgeonError, match="blocksize"):
        prune_sparsegpt(W, A, 10, NMPattern(2, 4), blocksize=6)
    with pytest.raises(SurgeonError, match="keep_mask"):
        prune_sparsegpt(W, A, 10, 0.5, keep_mask=torch.ones(8, 4, dtype=torch.bool))
    with pytest.raises(SurgeonError, match="non-finite"):
        prune_sparsegpt(W, A * float("nan"), 10, 0.5)
    with pytest.raises(SurgeonError, match="n_tokens"):
        prune_wanda(W, A, 0, 0.5)
    with pytest.raises(SurgeonError, match="scope"):
        prune_magnitude(W, A, 10, 0.5, scope="column")  # type: ignore[arg-type]
