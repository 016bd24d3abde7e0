"""2:4 semi-structured weights as plain tensors: kept values plus 2-bit positions packed in nibbles.

Layout (format version 1). A weight ``W [R, C]`` (``C`` a multiple of 4) qualifies when every
block of 4 consecutive inputs of every row holds at least 2 zeros (``NMPattern(n_zero=2,
block=4)`` of ``base/patterns.py``). It is stored as

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

Other N:M patterns (``K`` kept of every ``M``, e.g. 4:8 or 1:4; layout name ``"K:M"``) are stored as
``values [R, C*K/M]`` (the same rule: block ``b``'s ``K`` kept weights in column order, nonzeros
first, then zeros, lowest position first) and ``mask [R, ceil(C/8)]`` uint8, one bit per weight:
bit ``j % 8`` of byte ``j // 8`` is set when column ``j`` is stored (bits past ``C`` are 0). Every
block has exactly ``K`` bits set. Known answer, 4:8: ``[0, 1, 0, 2, 3, 0, 0, 4]`` ->
``values [1, 2, 3, 4]``, ``mask [0x9a]`` (columns 1, 3, 4 and 7: bits 1, 3, 4, 7). The mask costs
1/16 of a float16 weight, so a packed float16 linear takes ``K/M + 1/16`` of its dense bytes
(4:8: 0.5625, 1:4: 0.3125). For 2:4 the nibble layout above is used: it is what the 2:4 kernels
index by, at the same size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from base.errors import SurgeonError
from base.patterns import NMPattern

BLOCK = 4  # inputs per block
KEPT = 2  # values stored per block


def meta_columns(cols: int) -> int:
    """Bytes of metadata per row: two 4-column blocks per byte."""
    return (cols // BLOCK + 1) // 2


def packed_bytes(shape: tuple[int, int], dtype: torch.dtype) -> int:
    """Bytes of ``values`` plus ``meta`` for a 2:4 weight of ``shape`` and ``dtype``."""
    rows, cols = shape
    return rows * (cols // 2) * torch.empty((), dtype=dtype).element_size() + rows * meta_columns(cols)


def check_nm(W: torch.Tensor, pattern: NMPattern, name: str) -> None:
    """Raise a SurgeonError naming ``name`` and its first offending row unless ``W [R, C]`` has ``pattern``.

    Every block of ``M`` consecutive inputs must hold at least ``M - K`` zeros (NaN counts as nonzero).
    """
    if W.dim() != 2:
        raise SurgeonError(f"{name}: {pattern} packing needs a 2-D weight, got shape {list(W.shape)}")
    rows, cols = W.shape
    m = pattern.block
    pattern.check_shape(cols, name)
    zeros = (W.reshape(rows, cols // m, m) == 0).sum(-1)  # [R, C/M]
    bad = zeros < pattern.n_zero
    if bool(bad.any()):
        row = int(bad.any(-1).nonzero()[0])
        block = int(bad[row].nonzero()[0])
        raise SurgeonError(
            f"{name}: not {pattern} sparse: row {row} has {m - int(zeros[row, block])} nonzeros in columns "
            f"{m * block}..{m * block + m - 1} (every {m} consecutive inputs need at least {pattern.n_zero} zeros); "
            f"{int(bad.any(-1).sum())} of {rows} rows fail"
        )


def check_24(W: torch.Tensor, name: str) -> None:
    """:func:`check_nm` for 2:4."""
    check_nm(W, NMPattern(), name)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` viewed as integers of its element size: gathers and scatters on these move bit patterns
    exactly (torch's CPU gather of bfloat16 rewrites NaN payloads)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _check_parts(values: torch.Tensor, index: torch.Tensor, what: str, index_columns: Callable[[int], int],
                 shape: tuple[int, int], dtype: torch.dtype, pattern: NMPattern, name: str) -> None:
    """The shapes and dtypes of a packed N:M weight's ``values`` and uint8 ``index`` against its metadata."""
    m, kept = pattern.block, pattern.block - pattern.n_zero
    if len(shape) != 2 or min(shape) < 1:
        raise SurgeonError(f"{name}: {pattern} shape {list(shape)} is not [rows, cols]")
    pattern.check_shape(shape[1], name)
    rows, cols = shape
    if tuple(values.shape) != (rows, cols // m * kept):
        raise SurgeonError(f"{name}: values have shape {list(values.shape)}, expected {[rows, cols // m * kept]} "
                           f"for a {pattern} weight of shape {[rows, cols]}")
    if values.dtype != dtype:
        raise SurgeonError(f"{name}: values are {values.dtype}, metadata says {dtype}")
    if index.dtype != torch.uint8 or tuple(index.shape) != (rows, index_columns(cols)):
        raise SurgeonError(f"{name}: {pattern} {what} is {index.dtype} {list(index.shape)}, "
                           f"expected torch.uint8 {[rows, index_columns(cols)]}")


def _kept_positions(blocks: torch.Tensor, kept: int) -> torch.Tensor:
    """``[R, B, K]`` increasing in-block positions to store from ``blocks [R, B, M]``: nonzeros
    first, then zeros, lowest position first."""
    nonzero = (blocks != 0).to(torch.int8)
    order = torch.sort(-nonzero, dim=-1, stable=True).indices[..., :kept]  # nonzeros first
    return order.sort(dim=-1).values


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
    pos = _kept_positions(blocks, KEPT)  # [R, C/4, 2], i0 < i1
    values = _bits(blocks).gather(-1, pos).view(W.dtype).reshape(rows, cols // 2)  # [R, C/2]
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
    _check_parts(values, meta, "metadata", meta_columns, shape, dtype, NMPattern(), name)
    rows, cols = shape
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
    _bits(W).scatter_(-1, pos, _bits(values).reshape(rows, n_blocks, KEPT))
    return W.reshape(rows, cols)


def mask_columns(cols: int) -> int:
    """Bytes of an N:M bit mask per row: one bit per column."""
    return (cols + 7) // 8


def nm_bytes(shape: tuple[int, int], dtype: torch.dtype, pattern: NMPattern) -> int:
    """Bytes of ``values`` plus ``mask`` for an N:M weight of ``shape`` and ``dtype``."""
    rows, cols = shape
    kept = cols // pattern.block * (pattern.block - pattern.n_zero)
    return rows * kept * torch.empty((), dtype=dtype).element_size() + rows * mask_columns(cols)


def pack_nm(W: torch.Tensor, pattern: NMPattern, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress an N:M weight into ``(values [R, C*K/M], mask [R, ceil(C/8)] uint8)`` (module docstring).

    Example:
        >>> values, mask = pack_nm(torch.tensor([[0.0, 1, 0, 2, 3, 0, 0, 4]]), NMPattern(4, 8), "w")
        >>> values.tolist(), hex(int(mask[0, 0]))
        ([[1.0, 2.0, 3.0, 4.0]], '0x9a')
    """
    check_nm(W, pattern, name)
    rows, cols = W.shape
    m, kept = pattern.block, pattern.block - pattern.n_zero
    blocks = W.reshape(rows, cols // m, m)  # [R, C/M, M]
    pos = _kept_positions(blocks, kept)  # [R, C/M, K]
    values = _bits(blocks).gather(-1, pos).view(W.dtype).reshape(rows, -1)  # [R, C*K/M]
    stored = torch.zeros(rows, cols // m, m, dtype=torch.bool).scatter_(-1, pos, True).reshape(rows, cols)
    bits = torch.cat([stored, stored.new_zeros(rows, 8 * mask_columns(cols) - cols)], dim=1)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    mask = (bits.reshape(rows, -1, 8).to(torch.uint8) * weights).sum(-1, dtype=torch.uint8)  # [R, ceil(C/8)]
    return values.contiguous(), mask.contiguous()


def unpack_nm(values: torch.Tensor, mask: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype,
              pattern: NMPattern, name: str) -> torch.Tensor:
    """Rebuild the dense ``[R, C]`` weight from :func:`pack_nm`'s tensors, checking them first.

    Raises:
        SurgeonError: naming ``name`` (and the row) when shapes, dtypes or the mask are inconsistent.
    """
    _check_parts(values, mask, "mask", mask_columns, shape, dtype, pattern, name)
    m, kept = pattern.block, pattern.block - pattern.n_zero
    rows, cols = shape
    bits = ((mask.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).bool().reshape(rows, -1)  # [R, 8*ceil(C/8)]
    if bool(bits[:, cols:].any()):
        row = int(bits[:, cols:].any(-1).nonzero()[0])
        raise SurgeonError(f"{name}: {pattern} mask row {row} has a bit set past column {cols - 1}")
    stored = bits[:, :cols]
    counts = stored.reshape(rows, cols // m, m).sum(-1)  # [R, C/M]
    bad = counts != kept
    if bool(bad.any()):
        row = int(bad.any(-1).nonzero()[0])
        block = int(bad[row].nonzero()[0])
        raise SurgeonError(f"{name}: {pattern} mask row {row}, block {block} marks {int(counts[row, block])} "
                           f"stored weights; every block stores exactly {kept}")
    W = torch.zeros(rows, cols, dtype=dtype, device=values.device)
    _bits(W)[stored] = _bits(values).reshape(-1)  # row-major: block by block, in column order, as packed
    return W
