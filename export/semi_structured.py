"""2:4 semi-structured weights as plain tensors: kept values plus 2-bit positions packed in nibbles.

Layout (format version 1). A weight ``W [R, C]`` (``C`` a multiple of 4) qualifies when every
block of 4 consecutive inputs of every row holds at least 2 zeros (``NMPattern(n_zero=2,
block=4)`` of ``surgeon/prune/patterns.py``). It is stored as

- ``values [R, C/2]``, W's dtype: block ``b`` of row ``r`` keeps two weights, at
  ``values[r, 2b]`` and ``values[r, 2b + 1]``, in column order;
- ``meta [R, ceil(C/8)]``, uint8: block ``b``'s in-block positions ``i0 < i1`` (each 0..3) form the
  nibble ``i0 | i1 << 2``; byte ``j`` holds block ``2j`` in its low nibble and block ``2j + 1`` in
  its high nibble. When ``C/4`` is odd, the last byte's high nibble is 0.

Known answer: the row ``[0, 1, 0, 2, 3, 0, 0, 4]`` is ``values [1, 2, 3, 4]`` and
``meta [0xCD]`` (block 0 keeps positions 1, 3: nibble ``1 | 3 << 2 = 0xD``; block 1 keeps 0, 3:
``0xC``). Which positions are kept: the block's nonzeros first, then its zeros, lowest position
first, so a block with fewer than two nonzeros still stores exactly two values. Unpacking scatters
the values back and fills the rest with +0.0, so the round trip is exact bit for bit for every
weight whose zeros are +0.0 (all nonzeros, NaN and inf included, always come back bit for bit).
A -0.0 that is not stored, as ``W * mask`` leaves for negative weights, comes back as +0.0: equal
in value (``torch.equal`` holds), and every sum of products is unchanged.

The metadata costs 4 bits per 4 weights, 1/16 of a float16 weight's 16 bits per weight: a packed
float16 linear takes ``0.5 + 1/16 = 0.5625`` of its dense bytes (:func:`packed_bytes`). These are
the 2-bit indices of NVIDIA's 2:4 sparse tensor cores in plain row-major order; the swizzled
layout the kernels want is built at load time by ``torch.sparse.to_sparse_semi_structured``
(``runtime/semi_structured.py``).
"""

from __future__ import annotations

import torch

from surgeon.errors import SurgeonError

BLOCK = 4  # inputs per block
KEPT = 2  # values stored per block


def meta_columns(cols: int) -> int:
    """Bytes of metadata per row: two 4-column blocks per byte."""
    return (cols // BLOCK + 1) // 2


def packed_bytes(shape: tuple[int, int], dtype: torch.dtype) -> int:
    """Bytes of ``values`` plus ``meta`` for a 2:4 weight of ``shape`` and ``dtype``."""
    rows, cols = shape
    return rows * (cols // 2) * torch.empty((), dtype=dtype).element_size() + rows * meta_columns(cols)


def check_24(W: torch.Tensor, name: str) -> None:
    """Raise a SurgeonError naming ``name`` and its first offending row unless ``W [R, C]`` is 2:4.

    Every block of 4 consecutive inputs must hold at least 2 zeros (NaN counts as nonzero).
    """
    if W.dim() != 2:
        raise SurgeonError(f"{name}: 2:4 packing needs a 2-D weight, got shape {list(W.shape)}")
    rows, cols = W.shape
    if cols % BLOCK:
        raise SurgeonError(f"{name}: {cols} input columns are not a multiple of the 2:4 block size 4")
    zeros = (W.reshape(rows, cols // BLOCK, BLOCK) == 0).sum(-1)  # [R, C/4]
    bad = zeros < BLOCK - KEPT
    if bool(bad.any()):
        row = int(bad.any(-1).nonzero()[0])
        block = int(bad[row].nonzero()[0])
        raise SurgeonError(
            f"{name}: not 2:4 sparse: row {row} has {BLOCK - int(zeros[row, block])} nonzeros in columns "
            f"{BLOCK * block}..{BLOCK * block + 3} (every 4 consecutive inputs need at least 2 zeros); "
            f"{int(bad.any(-1).sum())} of {rows} rows fail"
        )


def pack_24(W: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress a 2:4 weight into ``(values [R, C/2], meta [R, ceil(C/8)] uint8)`` (module docstring).

    Args:
        W: ``[R, C]`` weight of any floating dtype, checked with :func:`check_24` first.
        name: the tensor's name, for errors.

    Example:
        >>> values, meta = pack_24(torch.tensor([[0.0, 1, 0, 2, 3, 0, 0, 4]]), "w")
        >>> values.tolist(), hex(int(meta[0, 0]))
        ([[1.0, 2.0, 3.0, 4.0]], '0xcd')
    """
    check_24(W, name)
    rows, cols = W.shape
    blocks = W.reshape(rows, cols // BLOCK, BLOCK)  # [R, C/4, 4]
    nonzero = (blocks != 0).to(torch.int8)
    order = torch.sort(-nonzero, dim=-1, stable=True).indices[..., :KEPT]  # [R, C/4, 2], nonzeros first
    pos = order.sort(dim=-1).values  # [R, C/4, 2], i0 < i1
    values = blocks.gather(-1, pos).reshape(rows, cols // 2)  # [R, C/2]
    nibbles = (pos[..., 0] | pos[..., 1] << 2).to(torch.uint8)  # [R, C/4]
    if nibbles.shape[1] % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(rows, 1)], dim=1)
    meta = nibbles[:, 0::2] | nibbles[:, 1::2] << 4  # [R, ceil(C/8)]
    return values.contiguous(), meta.contiguous()


def unpack_24(
    values: torch.Tensor, meta: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype, name: str
) -> torch.Tensor:
    """Rebuild the dense ``[R, C]`` weight from :func:`pack_24`'s tensors, checking them first.

    Args:
        values: ``[R, C/2]`` kept weights, of ``dtype``.
        meta: ``[R, ceil(C/8)]`` uint8 nibble-packed positions.
        shape: the original ``(R, C)``; dtype: the original dtype (both from the file's metadata).
        name: the tensor's name, for errors.

    Raises:
        SurgeonError: naming ``name`` (and the row) when shapes, dtypes or metadata are inconsistent.
    """
    if len(shape) != 2 or shape[1] % BLOCK or min(shape) < 1:
        raise SurgeonError(f"{name}: 2:4 shape {list(shape)} is not [rows, cols] with cols a multiple of 4")
    rows, cols = shape
    if tuple(values.shape) != (rows, cols // 2):
        raise SurgeonError(f"{name}: values have shape {list(values.shape)}, expected {[rows, cols // 2]} "
                           f"for a 2:4 weight of shape {[rows, cols]}")
    if values.dtype != dtype:
        raise SurgeonError(f"{name}: values are {values.dtype}, metadata says {dtype}")
    if meta.dtype != torch.uint8 or tuple(meta.shape) != (rows, meta_columns(cols)):
        raise SurgeonError(f"{name}: 2:4 metadata is {meta.dtype} {list(meta.shape)}, "
                           f"expected torch.uint8 {[rows, meta_columns(cols)]}")
    nibbles = torch.stack([meta & 15, meta >> 4], dim=-1).reshape(rows, -1)  # [R, 2 * ceil(C/8)]
    n_blocks = cols // BLOCK
    if nibbles.shape[1] > n_blocks and bool((nibbles[:, n_blocks:] != 0).any()):
        row = int((nibbles[:, n_blocks:] != 0).any(-1).nonzero()[0])
        raise SurgeonError(f"{name}: 2:4 metadata row {row} has a nonzero padding nibble")
    nibbles = nibbles[:, :n_blocks]  # [R, C/4]
    i0, i1 = nibbles & 3, nibbles >> 2
    bad = i0 >= i1
    if bool(bad.any()):
        row = int(bad.any(-1).nonzero()[0])
        block = int(bad[row].nonzero()[0])
        raise SurgeonError(f"{name}: 2:4 metadata row {row}, block {block} holds positions "
                           f"{int(i0[row, block])}, {int(i1[row, block])}; need two increasing positions in 0..3")
    pos = torch.stack([i0, i1], dim=-1).long()  # [R, C/4, 2]
    W = torch.zeros(rows, n_blocks, BLOCK, dtype=dtype, device=values.device)
    W.scatter_(-1, pos, values.reshape(rows, n_blocks, KEPT))
    return W.reshape(rows, cols)
