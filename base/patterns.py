"""Sparsity targets: the N:M semi-structured pattern and plain fractions.

The letters are defined once, here: ``NMPattern(n_zero=2, block=4)`` means that in every block of
``block`` consecutive inputs of a row, ``n_zero`` weights are removed (2:4 sparsity keeps 2 of 4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from base.errors import SurgeonError


@dataclass(frozen=True)
class NMPattern:
    """Remove ``n_zero`` of every ``block`` consecutive weights along the input dimension."""

    n_zero: int = 2
    block: int = 4

    def __post_init__(self) -> None:
        if self.block < 2 or not (0 < self.n_zero < self.block):
            raise SurgeonError(
                f"invalid N:M pattern {self.n_zero}:{self.block}: need 0 < zeros < block size"
            )

    @property
    def sparsity(self) -> float:
        return self.n_zero / self.block

    def __str__(self) -> str:
        return f"{self.block - self.n_zero}:{self.block}"

    @classmethod
    def parse(cls, text: str) -> NMPattern:
        """Parse ``"2:4"`` (kept:block, the usual notation) into ``NMPattern(n_zero=2, block=4)``."""
        try:
            kept, block = (int(part) for part in text.split(":"))
        except ValueError:
            raise SurgeonError(f"invalid N:M pattern {text!r}: expected KEPT:BLOCK, e.g. 2:4") from None
        if not 0 < kept < block:
            raise SurgeonError(f"invalid N:M pattern {text!r}: need 0 < kept < block")
        return cls(n_zero=block - kept, block=block)

    def check_shape(self, d_in: int, name: str = "weight") -> None:
        """Raise unless a layer with ``d_in`` inputs splits into whole blocks (the one check of an N:M
        shape: pruning targets, packing, packed metadata)."""
        if d_in % self.block:
            raise SurgeonError(
                f"{name}: {d_in} input columns are not a multiple of the {self} block size {self.block}"
            )

    def mask_from_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Boolean keep-mask removing the ``n_zero`` lowest scores in each block of each row.

        Args:
            scores: ``[d_out, d_in]`` removal costs or saliencies, higher means keep.
        """
        d_out, d_in = scores.shape
        self.check_shape(d_in)
        blocks = scores.reshape(d_out, d_in // self.block, self.block)  # [R, C/M, M]
        drop = blocks.topk(self.n_zero, dim=-1, largest=False).indices
        keep = torch.ones_like(blocks, dtype=torch.bool).scatter_(-1, drop, False)
        return keep.reshape(d_out, d_in)

    def holds(self, mask: torch.Tensor) -> bool:
        """True when a keep-mask ``[d_out, d_in]`` has at least ``n_zero`` zeros in every block."""
        d_out, d_in = mask.shape
        if d_in % self.block:
            return False
        zeros = (~mask.bool()).reshape(d_out, d_in // self.block, self.block).sum(-1)
        return bool((zeros >= self.n_zero).all())


def check_sparsity(fraction: float) -> float:
    """Validate an unstructured sparsity fraction in [0, 1)."""
    if not 0.0 <= fraction < 1.0:
        raise SurgeonError(f"sparsity must be in [0, 1), got {fraction}")
    return fraction
