"""A Linear whose weight is a torch sparse CSR or BSR tensor (the ``torch-csr`` backend).

``y = x W^T + b`` computed as ``(W @ x^T)^T`` with ``torch.sparse.mm``: sparse ``[R, C]`` times dense
``[C, N]``, the product torch's CPU (MKL) and CUDA (cuSPARSE) sparse kernels implement. Whether that
beats dense at a given sparsity is measured by ``benchmarks/sparse_formats.py``
(``benchmarks/results/sparse_formats.md``).
"""

from __future__ import annotations

import torch
from torch import nn


def sparse_linear(x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T + b`` for a sparse CSR/BSR ``W [R, C]`` and dense ``x [..., C]``; returns ``[..., R]``.

    Example:
        >>> W = torch.tensor([[0.0, 2.0], [3.0, 0.0]])
        >>> sparse_linear(torch.ones(1, 2), W.to_sparse_csr()).tolist()
        [[2.0, 3.0]]
    """
    x2 = x.reshape(-1, x.shape[-1])  # [N, C]
    y = torch.sparse.mm(W, x2.t().contiguous()).t()  # [R, C] @ [C, N] -> [R, N] -> [N, R]
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], W.shape[0])


class SparseLinear(nn.Module):
    """Drop-in for ``nn.Linear`` holding a CSR or BSR weight ``[out_features, in_features]`` as a buffer."""

    weight: torch.Tensor

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if weight.layout not in (torch.sparse_csr, torch.sparse_bsr):
            raise ValueError(f"SparseLinear needs a CSR or BSR weight, got {weight.layout}")
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.register_buffer("weight", weight)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        nnz = torch.Tensor.values(self.weight).numel()
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"layout={str(self.weight.layout).removeprefix('torch.')}, stored={nnz}")
