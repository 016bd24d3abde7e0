"""Kronecker-factored Fisher ``F ≈ G ⊗ A`` of a linear layer: factors, damping, inverses.

LLM Surgeon (van der Ouderaa et al., ICLR 2024, arXiv 2312.17244, Sec. 3) approximates the Fisher
of a linear layer's row-major ``vec(W)`` by ``F ≈ G ⊗ A`` with ``A = E[x xᵀ]`` (inputs, ``[d_in,
d_in]``) and ``G = E[g gᵀ]`` (output gradients, ``[d_out, d_out]``), so ``F⁻¹ ≈ G⁻¹ ⊗ A⁻¹``
(ALGORITHMS.md, "Notation"). The pair is defined only up to ``(cG) ⊗ (A/c)``: :func:`rescale` fixes
``c`` so both have the same Frobenius norm, then each is damped as ``M + λ·mean(diag M)·I`` and
inverted in float64 through Cholesky, raising λ tenfold whenever a factorisation fails.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from base.integrity import all_finite
from surgeon.curvature.activations import SecondMoment

log = logging.getLogger(__name__)

GradSecondMoment = SecondMoment
"""Accumulator for ``G``: the same running mean of ``g gᵀ``, fed the gradients w.r.t. outputs."""


@dataclass
class KronFactor:
    """One linear layer's Kronecker factors: ``A`` ``[d_in, d_in]`` and ``G`` ``[d_out, d_out]``."""

    A: Tensor
    G: Tensor

    def __post_init__(self) -> None:
        for name, M in (("A", self.A), ("G", self.G)):
            if M.ndim != 2 or M.shape[0] != M.shape[1]:
                raise ValueError(f"KronFactor.{name} must be square, got shape {tuple(M.shape)}")


KronFactors = dict[str, KronFactor]
"""Factors of every pruned linear, keyed by module name (``"model.layers.0.mlp.up_proj"``)."""


class DampedKron(NamedTuple):
    """Damped factors and their inverses, all float64; unpacks as ``A, G, A_inv, G_inv``."""

    A: Tensor
    G: Tensor
    A_inv: Tensor
    G_inv: Tensor


def rescale(A: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
    """Scale ``A`` by ``c`` and ``G`` by ``1/c`` so that ``‖A‖_F = ‖G‖_F``; ``G ⊗ A`` is unchanged.

    Args:
        A: ``[d_in, d_in]`` input second moment (any float dtype).
        G: ``[d_out, d_out]`` output-gradient second moment.

    Example:
        >>> A, G = rescale(torch.tensor([[8.0]]), torch.tensor([[2.0]]))
        >>> float(A), float(G)  # both sqrt(8 * 2); the product A * G stays 16
        (4.0, 4.0)
    """
    c = _balance(A, G)
    return A * c, G / c


def _balance(A: Tensor, G: Tensor) -> Tensor:
    """The ``c`` of :func:`rescale`."""
    norm_A, norm_G = A.norm(), G.norm()
    if norm_A == 0 or norm_G == 0:
        raise ValueError("cannot rescale Kronecker factors: one of them is zero")
    return torch.sqrt(norm_G / norm_A)  # c·‖A‖ = ‖G‖/c = sqrt(‖A‖·‖G‖)


def damp(M: Tensor, lam: float) -> Tensor:
    """Return ``M + lam·mean(diag M)·I``: damping relative to the factor's own scale.

    Args:
        M: ``[d, d]`` symmetric positive semi-definite matrix.
        lam: relative damping, e.g. 0.01.

    Example:
        >>> damp(torch.tensor([[2.0, 1.0], [1.0, 4.0]]), 0.1)
        tensor([[2.3000, 1.0000],
                [1.0000, 4.3000]])
    """
    return damp_(M.clone(), lam)  # one copy, its diagonal raised: not an identity, its product and a sum of d² each


def damp_(M: Tensor, lam: float) -> Tensor:
    """:func:`damp` in place: ``M``'s diagonal raised by ``lam·mean(diag M)``; returns ``M``."""
    scale = M.diagonal().mean()
    # An all-zero diagonal (a dead layer) has no scale of its own: damp absolutely instead.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    M.diagonal().add_(lam * scale)
    return M


def inverse_spd(M: Tensor, lam: float = 0.01, max_tries: int = 8) -> tuple[Tensor, float]:
    """Float64 Cholesky inverse of ``damp(M, lam)``, multiplying ``lam`` by 10 until it factorises.

    Args:
        M: ``[d, d]`` symmetric positive semi-definite matrix (any float dtype).
        lam: initial relative damping (see :func:`damp`); 0 tries the undamped matrix first.
        max_tries: number of factorisations attempted before giving up.

    Returns:
        ``(M_inv, lam_used)``: ``M_inv`` ``[d, d]`` float64 is the inverse of ``damp(M, lam_used)``.

    Raises:
        FloatingPointError: ``M`` is not finite, or no damping up to ``lam·10^(max_tries-1)`` worked.

    Example:
        >>> M_inv, lam = inverse_spd(torch.ones(2, 2), lam=0.0)  # singular: retried with damping
        >>> lam
        1e-06
    """
    M = M.to(torch.float64)  # float64: damped factors of LLM layers have condition numbers ~1e6+
    if not all_finite(M):
        raise FloatingPointError("non-finite values in a curvature factor")
    lam_try = lam
    for attempt in range(max_tries):
        S = M + M.T  # symmetrise: accumulated float sums are symmetric only up to rounding
        S.mul_(0.5)  # (exactly the halving of (M + M.T) / 2, without a second d² temporary)
        L, info = torch.linalg.cholesky_ex(damp_(S, lam_try))  # damped in place: one d² beside M and L
        del S
        if int(info) == 0:
            return torch.cholesky_inverse(L), lam_try
        new_lam = lam_try * 10 if lam_try > 0 else 1e-6  # from no damping, start at 1e-6 relative
        log.warning(
            "Cholesky failed for a %dx%d factor with damping %.3g (attempt %d/%d); retrying with %.3g",
            M.shape[0], M.shape[0], lam_try, attempt + 1, max_tries, new_lam,
        )
        lam_try = new_lam
    raise FloatingPointError(f"Cholesky failed {max_tries} times; last damping tried {lam_try / 10:.3g}")


def prepare(A: Tensor, G: Tensor, lam_A: float = 0.01, lam_G: float = 0.01) -> DampedKron:
    """Rescale, damp and invert a layer's factors, as ALGORITHMS.md prescribes.

    Args:
        A: ``[d_in, d_in]`` input second moment.
        G: ``[d_out, d_out]`` output-gradient second moment.
        lam_A: relative damping of ``A`` (about 0.01).
        lam_G: relative damping of ``G`` (about 0.01; about 0.1 helps for unstructured and 2:4).

    Returns:
        :class:`DampedKron` ``(A, G, A_inv, G_inv)`` in float64; ``A_inv`` is exactly the inverse of
        the returned damped ``A`` (damping raised if Cholesky needed it), likewise for ``G``.

    Example:
        >>> A, G, A_inv, G_inv = prepare(torch.eye(3), 4 * torch.eye(2), lam_A=0.0, lam_G=0.0)
        >>> bool(torch.allclose(A @ A_inv, torch.eye(3, dtype=torch.float64)))
        True
    """
    return _prepare(A, G, lam_A, lam_G)[0]


def _prepare(A: Tensor, G: Tensor, lam_A: float, lam_G: float, *,
             in_place: bool = False) -> tuple[DampedKron, float, float]:
    """:func:`prepare`, and the dampings it ended up using (raised where Cholesky needed it).

    ``in_place``: float64 ``A`` and ``G`` become the returned damped factors (rescaled and damped in place,
    the same values): no ``d²`` copy of either, for factors nothing else reads.
    """
    if in_place and A.dtype == G.dtype == torch.float64:
        c = _balance(A, G)  # rescale's, applied in place: A * c and G / c, the same bits
        A.mul_(c)
        G.div_(c)
    else:
        in_place = False
        A, G = rescale(A.to(torch.float64), G.to(torch.float64))
    A_inv, lam_A = inverse_spd(A, lam_A)
    G_inv, lam_G = inverse_spd(G, lam_G)
    damped = damp_ if in_place else damp
    return DampedKron(damped(A, lam_A), damped(G, lam_G), A_inv, G_inv), lam_A, lam_G


class LazyDamped(Mapping[str, DampedKron]):
    """:func:`prepare`'d factors of many linears, computed on first use and only a few kept.

    Every linear's damped factors and inverses at once took ~5 GiB of float64 on the default model
    (four ``d²`` matrices per linear, shared ``A`` copied per linear by the rescaling); a pass that
    goes layer by layer needs only the current layer's, so the most recently used ``cache`` are kept
    and the rest recomputed on demand (one Cholesky inverse of each factor, cheap next to K-FAC).
    A recomputation starts from the damping the first one ended with, so a factor that needed more
    damping is factorised once, and its warning logged once.
    """

    def __init__(self, factors: KronFactors, lam_A: float, lam_G: float, cache: int = 8, *,
                 consume: bool = False) -> None:
        """``consume``: the factors are this object's alone (the caller keeps no use for them): each is turned
        into its damped factor in place where no other linear shares it, saving its two ``d²`` copies, and
        cannot be prepared a second time (``cache`` must then hold every linear used)."""
        self._factors, self._size = (dict(factors) if consume else factors), cache
        self._consume = consume
        uses: dict[int, int] = {}
        for f in factors.values():
            for t in (f.A, f.G):
                uses[id(t)] = uses.get(id(t), 0) + 1
        self._alone = {n for n, f in factors.items() if uses[id(f.A)] == 1 and uses[id(f.G)] == 1}
        self._cache: OrderedDict[str, DampedKron] = OrderedDict()
        self._lams: dict[str, tuple[float, float]] = {}  # per linear: the dampings that worked
        self._default = (lam_A, lam_G)

    def __getitem__(self, name: str) -> DampedKron:
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        f = self._factors[name]
        if f is None:
            raise RuntimeError(f"the factors of {name} were consumed and dropped from the cache")
        in_place = self._consume and name in self._alone
        if self._consume:
            self._factors[name] = None  # type: ignore[index]
        damped, lam_A, lam_G = _prepare(f.A, f.G, *self._lams.get(name, self._default), in_place=in_place)
        self._lams[name] = (lam_A, lam_G)
        self._cache[name] = damped
        while len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return damped

    def __iter__(self) -> Iterator[str]:
        return iter(self._factors)

    def __len__(self) -> int:
        return len(self._factors)
