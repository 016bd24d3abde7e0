"""Unstructured sparse weights as torch CSR / BSR parts: ``crow_indices``, ``col_indices``, ``values``.

The parts are torch's own compressed-row layouts (``torch.sparse_csr_tensor`` and
``torch.sparse_bsr_tensor``), stored as plain tensors:

- CSR of ``W [R, C]``: ``crow_indices [R + 1]``, ``col_indices [nnz]`` (increasing within each row)
  and ``values [nnz]`` in row-major order, nonzero meaning ``W != 0`` (NaN is kept, -0.0 is not);
- BSR with blocks ``(br, bc)`` dividing ``(R, C)``: the same over the ``[R/br, C/bc]`` grid of blocks,
  a block stored whole (``values [nnzb, br, bc]``) when any of its weights is nonzero.

Indices are int32 when every index fits (int64 otherwise). Unpacking checks every invariant torch
would otherwise take on trust (a bad index there reads out of bounds) and names the tensor and row.
The round trip is exact, except that -0.0 comes back as +0.0 (equal in value). Storage is
``(R + 1 + nnz) * index bytes + nnz * value bytes``: CSR is smaller than dense float32 only above
50% sparsity with int32 indices (above 67% for float16); whether it is faster is measured by
``benchmarks/sparse_formats.py``.
"""

from __future__ import annotations

import warnings

import torch

from base.errors import SurgeonError

INDEX_PARTS = ("crow_indices", "col_indices")
PARTS = (*INDEX_PARTS, "values")


def _index_dtype(*sizes: int) -> torch.dtype:
    return torch.int32 if max(sizes) < 2**31 else torch.int64


def _compress(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``crow_indices``, ``col_indices`` of a boolean ``[rows, cols]`` keep-mask."""
    rows, cols = keep.shape
    dtype = _index_dtype(rows + 1, cols, int(keep.sum()))
    crow = torch.cat([keep.new_zeros(1, dtype=torch.long), keep.sum(1).cumsum(0)]).to(dtype)
    col = keep.nonzero()[:, 1].to(dtype)  # row-major order, so increasing within a row
    return crow, col


def pack_csr(W: torch.Tensor) -> dict[str, torch.Tensor]:
    """CSR parts of a 2-D weight ``W [R, C]``.

    Example:
        >>> parts = pack_csr(torch.tensor([[0.0, 2.0], [3.0, 0.0]]))
        >>> [parts[k].tolist() for k in PARTS]
        [[0, 1, 2], [1, 0], [2.0, 3.0]]
    """
    keep = W != 0
    crow, col = _compress(keep)
    return {"crow_indices": crow, "col_indices": col, "values": W[keep].contiguous()}


def check_blocksize(shape: tuple[int, ...], blocksize: tuple[int, int], name: str) -> None:
    """Raise unless ``blocksize`` is positive and divides the 2-D ``shape``."""
    br, bc = blocksize
    if len(shape) != 2 or br < 1 or bc < 1 or shape[0] % br or shape[1] % bc:
        raise SurgeonError(f"{name}: shape {list(shape)} is not divisible into {br}x{bc} blocks")


def pack_bsr(W: torch.Tensor, blocksize: tuple[int, int], name: str) -> dict[str, torch.Tensor]:
    """BSR parts of ``W [R, C]`` with ``blocksize (br, bc)`` dividing its shape (else a SurgeonError)."""
    check_blocksize(tuple(W.shape), blocksize, name)
    (rows, cols), (br, bc) = W.shape, blocksize
    blocks = W.reshape(rows // br, br, cols // bc, bc).transpose(1, 2)  # [R/br, C/bc, br, bc]
    keep = (blocks != 0).flatten(2).any(-1)  # [R/br, C/bc]
    crow, col = _compress(keep)
    return {"crow_indices": crow, "col_indices": col, "values": blocks[keep].contiguous()}


def check_compressed(crow: torch.Tensor, col: torch.Tensor, n_rows: int, n_cols: int, name: str) -> None:
    """Check compressed-row indices over an ``[n_rows, n_cols]`` grid; a SurgeonError names the row."""
    if crow.dtype not in (torch.int32, torch.int64) or col.dtype != crow.dtype:
        raise SurgeonError(f"{name}: indices are {crow.dtype} and {col.dtype}; need both int32 or both int64")
    if crow.dim() != 1 or crow.numel() != n_rows + 1 or col.dim() != 1:
        raise SurgeonError(f"{name}: crow_indices has shape {list(crow.shape)}, expected [{n_rows + 1}]")
    counts = crow.long().diff()
    if int(crow[0]) != 0 or bool((counts < 0).any()):
        row = 0 if int(crow[0]) != 0 else int((counts < 0).nonzero()[0])
        raise SurgeonError(f"{name}: crow_indices must start at 0 and never decrease (row {row})")
    if int(crow[-1]) != col.numel():
        raise SurgeonError(f"{name}: crow_indices ends at {int(crow[-1])} but there are {col.numel()} column indices")
    row_of = torch.repeat_interleave(torch.arange(n_rows), counts)  # [nnz]
    out_of_range = (col < 0) | (col >= n_cols)
    unsorted = torch.cat([torch.zeros(1, dtype=torch.bool), (row_of[1:] == row_of[:-1]) & (col.diff() <= 0)])
    bad = out_of_range | unsorted
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        what = f"column {int(col[i])} outside 0..{n_cols - 1}" if bool(out_of_range[i]) else "columns not increasing"
        raise SurgeonError(f"{name}: row {int(row_of[i])}: {what}")


def unpack_compressed(
    parts: dict[str, torch.Tensor],
    shape: tuple[int, int],
    dtype: torch.dtype,
    name: str,
    blocksize: tuple[int, int] | None = None,
) -> torch.Tensor:
    """A checked torch sparse CSR tensor (``blocksize=None``) or BSR tensor of ``shape`` from its parts.

    Args:
        parts: ``crow_indices``, ``col_indices`` and ``values`` as stored.
        shape: ``(R, C)``; dtype: the values' dtype (both from the file's metadata).
        blocksize: ``(br, bc)`` for BSR.

    Raises:
        SurgeonError: naming ``name`` (and the row) when a part is missing or inconsistent.
    """
    missing = [p for p in PARTS if p not in parts]
    if missing:
        raise SurgeonError(f"{name}: part {missing[0]} is missing")
    if len(shape) != 2 or min(shape) < 1:
        raise SurgeonError(f"{name}: sparse shape {list(shape)} is not [rows, cols]")
    crow, col, values = (parts[p] for p in PARTS)
    if values.dtype != dtype:
        raise SurgeonError(f"{name}: values are {values.dtype}, metadata says {dtype}")
    tail: tuple[int, ...] = ()
    if blocksize is None:
        grid = shape
    else:
        check_blocksize(shape, blocksize, name)
        grid, tail = (shape[0] // blocksize[0], shape[1] // blocksize[1]), tuple(blocksize)
    check_compressed(crow, col, grid[0], grid[1], name)
    if tuple(values.shape) != (col.numel(), *tail):
        raise SurgeonError(f"{name}: values have shape {list(values.shape)}, expected {[col.numel(), *tail]}")
    make = torch.sparse_csr_tensor if blocksize is None else torch.sparse_bsr_tensor
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse (CSR|BSR) tensor support is in beta")
        return make(crow, col, values, size=shape, check_invariants=False)  # checked above


def parts_bytes(parts: dict[str, torch.Tensor]) -> int:
    """Bytes of the stored parts."""
    return sum(t.numel() * t.element_size() for t in parts.values())
