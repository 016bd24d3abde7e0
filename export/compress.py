"""Turn fully zeroed couplings of a masked model into surgery (STYLE.md section 3).

LLM Surgeon and the other pruners only zero rows and columns; they never shrink a tensor. A
coupled group whose contribution to the residual stream is exactly zero can be cut out without
changing any output:

- MLP channel ``c``: its column in down (fc2) is zero, or its rows in gate and up (fc1), with
  their bias entries, are all zero (every supported activation maps 0 to 0);
- query head ``h``: its ``head_dim`` columns of o are zero;
- KV group ``g``: every one of its query heads is zero.

:func:`find_zero_groups` finds them and returns a :class:`~base.surgery.RemovalPlan` that obeys
the coupling rules: query heads are removed in equal numbers from every kept KV group (surplus zero
heads stay as zeros), and each layer keeps at least one channel and one KV group.
:func:`silent_blocks` says which layers' attention or MLP adds nothing at all (every group zero and no
output bias), which layouts that can leave a block out (Nemotron-NAS's ``no_op``) then do.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from base.adapters import Adapter
from base.surgery import LayerPlan, LayerShape, RemovalPlan, layer_shapes


def _zero_rows(linear: nn.Linear, size: int) -> Tensor:
    """Which of ``size`` equal row blocks of ``linear`` are entirely zero (bias included)."""
    W = linear.weight.detach().reshape(size, -1)  # [size, block * d_in]
    zero = (W == 0).all(dim=1)
    if linear.bias is not None:
        zero &= (linear.bias.detach().reshape(size, -1) == 0).all(dim=1)
    return zero.cpu()


def _zero_cols(linear: nn.Linear, size: int) -> Tensor:
    """Which of ``size`` equal column blocks of ``linear`` are entirely zero."""
    W = linear.weight.detach().reshape(linear.out_features, size, -1)  # [d_out, size, block]
    return (W == 0).all(dim=2).all(dim=0).cpu()


def _zero_groups(layer: nn.Module, shape: LayerShape, adapter: Adapter) -> tuple[Tensor, Tensor]:
    """Which MLP channels ``[width]`` and which query heads ``[heads]`` of one layer contribute exactly zero."""
    width, n = shape.intermediate_size, shape.num_attention_heads
    cols = torch.stack([_zero_cols(adapter.linear(layer, m), width) for m in adapter.channel_cols]).all(0)
    rows = torch.stack([_zero_rows(adapter.linear(layer, m), width) for m in adapter.channel_rows]).all(0)
    heads = torch.stack([_zero_cols(adapter.linear(layer, m), n) for m in adapter.head_cols]).all(0)
    return cols | rows, heads


@torch.no_grad()
def find_zero_groups(model: nn.Module, adapter: Adapter) -> RemovalPlan:
    """The groups of ``model`` that contribute exactly zero and may be removed by ``shrink_``.

    Args:
        model: a (masked) causal LM of the family ``adapter`` describes.
        adapter: its layout.

    Returns:
        A plan naming, per layer, the zero MLP channels, zero KV groups and zero query heads
        removable under the coupling rules; layers with nothing to remove are left out.

    Example:
        >>> plan = find_zero_groups(model, LLAMA)  # doctest: +SKIP
        >>> manifest = shrink_(model, LLAMA, plan)  # logits unchanged  # doctest: +SKIP
    """
    plan = RemovalPlan()
    for i, (layer, shape) in enumerate(zip(adapter.decoder_layers(model), layer_shapes(model, adapter))):
        width, n, n_kv = shape.intermediate_size, shape.num_attention_heads, shape.num_key_value_heads
        zero_channels, zero_heads = _zero_groups(layer, shape, adapter)
        channels = torch.nonzero(zero_channels).flatten().tolist()
        if len(channels) == width:
            channels = channels[1:]  # keep one channel: a layer's MLP is never removed entirely

        group = n // n_kv
        per_group = zero_heads.reshape(n_kv, group)  # [n_kv, group]
        kv_groups = torch.nonzero(per_group.all(dim=1)).flatten().tolist()
        if len(kv_groups) == n_kv:
            kv_groups = kv_groups[1:]  # keep one KV group
        kept = [g for g in range(n_kv) if g not in kv_groups]
        # Query heads only in equal numbers from every kept group (the kernels' fixed group size).
        # A kept group keeps at least one query head (only the group kept as a floor can be all zero).
        common = min(min(int(per_group[g].sum()) for g in kept), group - 1)
        heads = [
            g * group + int(j) for g in kept for j in torch.nonzero(per_group[g]).flatten()[:common]
        ]
        if channels or kv_groups or heads:
            plan.layers[i] = LayerPlan.of(channels, heads, kv_groups)
    return plan


@torch.no_grad()
def silent_blocks(model: nn.Module, adapter: Adapter) -> list[tuple[bool, bool]]:
    """Per decoder layer, whether its attention and whether its MLP add exactly nothing to the residual stream.

    A block is silent when every one of its groups contributes zero (as :func:`find_zero_groups`
    counts them: every query head, every MLP channel) and its output projection (o, down) has no bias
    or a zero one. A masked model's fully zeroed MLP is silent; after :func:`find_zero_groups` and
    ``shrink_`` it keeps one zero channel, still silent.

    Example:
        >>> silent_blocks(model, LLAMA)  # doctest: +SKIP
        [(False, False), (False, True)]
    """
    out = []
    for layer, shape in zip(adapter.decoder_layers(model), layer_shapes(model, adapter)):
        channels, heads = _zero_groups(layer, shape, adapter)
        out.append((bool(heads.all()) and _no_bias(layer, adapter, adapter.head_cols),
                    bool(channels.all()) and _no_bias(layer, adapter, adapter.channel_cols)))
    return out


def _no_bias(layer: nn.Module, adapter: Adapter, names: tuple[str, ...]) -> bool:
    biases = [adapter.linear(layer, m).bias for m in names]
    return all(b is None or bool((b == 0).all()) for b in biases)
