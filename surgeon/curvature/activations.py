"""Second moment of a linear layer's inputs, accumulated over streamed calibration batches.

``A = (1/N) sum_t x_t x_t^T`` over all N calibration tokens (ALGORITHMS.md, notation). The same
statistic serves SparseGPT (its Hessian is ``2 N A`` up to scale), Wanda (``||x_j||_2^2 = N A_jj``)
and the input factor of LLM Surgeon's Kronecker curvature.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from base.distributed import OrderedSum
from base.integrity import all_finite

_LEADING = [0]  # positions at the start of every window that calibration statistics leave out


@contextmanager
def leading_positions_left_out(n: int) -> Iterator[None]:
    """Within: every calibration statistic leaves out the first ``n`` positions of each window.

    Used with ``n = 1`` where the windows lead with BOS (the tokenizer's convention, Gemma's): the same
    token in every window, whose activations in trained models are massive ("attention sink") and
    swamp the second moments of the data, says nothing about the text (docs/llm_surgeon.md, "BOS").
    A process-wide setting, not a context variable: autograd may run backward hooks on other threads.
    """
    before, _LEADING[0] = _LEADING[0], n
    try:
        yield
    finally:
        _LEADING[0] = before


def calibration_positions(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, T, ...]`` without the leading positions statistics leave out (unchanged by default)."""
    n = _LEADING[0]
    return x[:, n:] if n and x.dim() >= 3 else x


GRAM_BLOCKS = 4  # column blocks of :func:`gram`: 10 of 16 block products instead of 16


def gram(x: torch.Tensor) -> torch.Tensor:
    """``x^T x`` ``[d, d]`` of ``x`` ``[n, d]``, each block above the diagonal computed once and mirrored.

    With the columns cut into 4 blocks, block row ``i`` is one product ``x_i^T x[:, i:]``: 10 of the 16
    block products of ``x.T @ x``, about 0.6 of its multiply-adds (half the time of a 1536-wide K-FAC
    factor on a 2-core CPU). Every entry is the same dot product over the ``n`` rows as in ``x.T @ x``
    (equal to it on the real model's factors; within float rounding in general). Narrow inputs (under 256
    columns) take the one product.
    """
    n, d = x.shape
    if d < 256:
        return x.T @ x
    out = x.new_empty(d, d)
    edges = [round(i * d / GRAM_BLOCKS) for i in range(GRAM_BLOCKS + 1)]
    for lo, hi in zip(edges, edges[1:]):
        row = x[:, lo:hi].T @ x[:, lo:]  # [hi - lo, d - lo]: the diagonal block and the blocks right of it
        out[lo:hi, lo:] = row
        out[hi:, lo:hi] = row[:, hi - lo:].T
    return out


class SecondMoment(OrderedSum):
    """Running ``sum x x^T`` and token count over calibration batches; ``finalize()`` returns the mean ``A``.

    Each batch's ``x^T x`` is formed in the activations' own dtype (float32 matmuls are several
    times faster than float64 on CPU, and one batch's sum is short), then added into a float64
    running sum so that many batches lose nothing (in place: no float64 copy of the batch's sum).
    The batches are added in their global order on any number of ranks
    (:class:`~base.distributed.OrderedSum`; the passes run them through
    :func:`~base.distributed.over_batches`).

    ``diagonal``: only ``diag(A)``, the mean squares of the features, as a ``[dim]`` vector: all that
    Wanda reads, without the ``dim²`` matrix (0.97 GB in float64 at a Llama-2-7B ``down_proj``) or
    its ``tokens · dim²`` product. ``dtype``: the activations' dtype (the layer's weights'), which
    sets the batches' terms: float64 for float64 activations, float32 otherwise; by default, each
    batch's own.
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu", *, diagonal: bool = False,
                 dtype: torch.dtype | None = None) -> None:
        term = None if dtype is None else torch.float64 if dtype == torch.float64 else torch.float32
        super().__init__((dim,) if diagonal else (dim, dim), device, term)
        self.diagonal = diagonal

    def update(self, x: torch.Tensor) -> None:
        """Add a batch of vectors ``x`` of shape ``[..., dim]`` (``[B, T, dim]``: less the leading positions left out)."""
        x = calibration_positions(x.detach()).reshape(-1, x.shape[-1])  # [tokens, dim]
        dtype = self.dtype or (x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32)
        x = x.to(dtype)
        xtx = x.square().sum(0) if self.diagonal else gram(x)  # [dim] or [dim, dim]
        if not all_finite(xtx):
            raise FloatingPointError("non-finite values in calibration activations")
        self.add(xtx, x.shape[0])

    def finalize(self, *, consume: bool = False) -> torch.Tensor:
        """Mean second moment ``A`` of shape ``[dim, dim]`` (float64; ``[dim]``, its diagonal, when ``diagonal``).

        ``consume``: divide the running sum in place and hand it over (no second ``dim²`` copy; the
        accumulator is spent), for factors as large as Llama-2-7B's (``11008²`` float64: 0.97 GB each).
        """
        if not self.complete:
            raise RuntimeError("a second moment was finalised before every rank's batches were added (over_batches)")
        if self.count == 0:
            raise ValueError("no calibration tokens were accumulated")
        if consume:
            mean, self.sum, self.count = self.sum.div_(self.count), torch.empty(0), 0
            return mean
        return self.sum / self.count
