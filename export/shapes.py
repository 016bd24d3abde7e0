"""Choose deployable sizes for a structured-removal plan: aligned widths, or one size for all layers.

A plan from the pruner (or from :func:`export.compress.find_zero_groups`) gives every layer its own
sizes. Two adjustments make them friendlier to hardware and software, both by cost (the cost of
removing a group, e.g. LLM Surgeon's ΔL: the highest-cost removed groups come back first, the
lowest-cost kept groups go first):

- :func:`align_plan` rounds every kept size to a multiple of ``N``: the MLP width, and the widths of
  q and k/v (``heads * head_dim``), by changing the number of KV groups;
- :func:`uniform_plan` gives every layer the same sizes (the largest kept in any layer, rounded up
  to a valid stock configuration), so that unmodified transformers can load the result.

Groups brought back are kept as they are in the model; for a masked model they are zeros, which add
nothing in exact arithmetic (in float32 the other matmul shapes round differently: the logits move
slightly, and :func:`export.pruned.shrink_and_save` measures by how much). Without costs, :func:`magnitude_costs` ranks groups by a weight-norm proxy
that is zero exactly for groups that contribute nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd
from typing import Any, Literal

import torch
from torch import nn

from base.adapters import Adapter
from base.errors import SurgeonError
from base.modeling import LAYER_FIELDS, stock_model_type
from base.surgery import (
    LayerCosts,
    LayerPlan,
    LayerShape,
    RemovalPlan,
    layer_shapes,
    resolve,
)

Rounding = Literal["up", "down", "nearest"]


@torch.no_grad()
def magnitude_costs(model: nn.Module, adapter: Adapter) -> dict[int, LayerCosts]:
    """A data-free removal cost per group: products of the members' squared norms (float64).

    MLP channel: ``Π_rows (‖W_c‖² + b_c²) · Π_cols ‖W_:,c‖²``; query head: ``‖o cols‖² · ‖v rows of
    its group‖²`` (bias included); KV group: 0 of its own (its query heads carry the cost).
    """
    costs: dict[int, LayerCosts] = {}
    for i, (layer, shape) in enumerate(zip(adapter.decoder_layers(model), layer_shapes(model, adapter))):
        channels = torch.ones(shape.intermediate_size, dtype=torch.float64)
        for name in adapter.channel_rows:
            channels *= _row_energy(adapter.linear(layer, name), shape.intermediate_size)
        for name in adapter.channel_cols:
            channels *= _col_energy(adapter.linear(layer, name), shape.intermediate_size)
        heads = torch.ones(shape.num_attention_heads, dtype=torch.float64)
        for name in adapter.head_cols:
            heads *= _col_energy(adapter.linear(layer, name), shape.num_attention_heads)
        group = shape.num_attention_heads // shape.num_key_value_heads
        v = _row_energy(adapter.linear(layer, adapter.kv_rows[-1]), shape.num_key_value_heads)
        heads *= v.repeat_interleave(group)
        costs[i] = LayerCosts(channels, heads, torch.zeros(shape.num_key_value_heads, dtype=torch.float64))
    return costs


def _row_energy(linear: nn.Linear, blocks: int) -> torch.Tensor:
    e = linear.weight.detach().double().reshape(blocks, -1).pow(2).sum(1)  # [blocks]
    if linear.bias is not None:
        e += linear.bias.detach().double().reshape(blocks, -1).pow(2).sum(1)
    return e.cpu()


def _col_energy(linear: nn.Linear, blocks: int) -> torch.Tensor:
    W = linear.weight.detach().double().reshape(linear.out_features, blocks, -1)  # [d_out, blocks, block]
    return W.pow(2).sum(dim=(0, 2)).cpu()


@dataclass
class _Layer:
    """Mutable kept-index sets of one layer while sizes are adjusted."""

    shape: LayerShape
    channels: set[int]
    heads: set[int]
    kv_groups: set[int]
    costs: LayerCosts

    @property
    def group(self) -> int:
        return self.shape.num_attention_heads // self.shape.num_key_value_heads

    @property
    def per_group(self) -> int:
        return len(self.heads) // len(self.kv_groups)

    def set_channels(self, target: int) -> None:
        self.channels = _resize(self.channels, range(self.shape.intermediate_size), target, self.costs.channels)

    def set_kv_groups(self, target: int, per_group: int) -> None:
        """Keep ``target`` KV groups with ``per_group`` query heads each, by cost."""
        group = self.group
        heads_of = {g: range(g * group, (g + 1) * group) for g in range(self.shape.num_key_value_heads)}

        def group_cost(g: int) -> float:
            kept = [h for h in heads_of[g] if h in self.heads]
            best = kept if kept else sorted(heads_of[g], key=lambda h: -float(self.costs.heads[h]))[:per_group]
            return float(self.costs.kv_groups[g]) + sum(float(self.costs.heads[h]) for h in best)

        group_costs = torch.tensor([group_cost(g) for g in range(self.shape.num_key_value_heads)])
        self.kv_groups = _resize(self.kv_groups, heads_of.keys(), target, group_costs)
        heads: set[int] = set()
        for g in self.kv_groups:
            kept = {h for h in heads_of[g] if h in self.heads}
            heads |= _resize(kept, heads_of[g], per_group, self.costs.heads)
        self.heads = heads

    def plan(self) -> LayerPlan:
        return LayerPlan.of(
            (c for c in range(self.shape.intermediate_size) if c not in self.channels),
            (h for h in range(self.shape.num_attention_heads) if h not in self.heads),
            (g for g in range(self.shape.num_key_value_heads) if g not in self.kv_groups),
        )


def _resize(kept: set[int], universe: Any, target: int, cost: torch.Tensor) -> set[int]:
    """Grow ``kept`` with the highest-cost others, or shrink it by dropping its lowest-cost members."""
    kept = set(kept)
    if target > len(kept):
        others = sorted((i for i in universe if i not in kept), key=lambda i: (-float(cost[i]), i))
        kept |= set(others[: target - len(kept)])
    elif target < len(kept):
        ordered = sorted(kept, key=lambda i: (float(cost[i]), -i))
        kept -= set(ordered[: len(kept) - target])
    return kept


def _layers(model: nn.Module, adapter: Adapter, plan: RemovalPlan, costs: dict[int, LayerCosts] | None) -> list[_Layer]:
    costs = costs if costs is not None else magnitude_costs(model, adapter)
    out = []
    for i, shape in enumerate(layer_shapes(model, adapter)):
        kept = resolve(shape, plan.get(i), i)
        if i not in costs:
            raise SurgeonError(f"no removal costs given for layer {i}")
        c = costs[i]
        expected = (shape.intermediate_size, shape.num_attention_heads, shape.num_key_value_heads)
        if (c.channels.numel(), c.heads.numel(), c.kv_groups.numel()) != expected:
            raise SurgeonError(f"layer {i}: removal costs do not match the layer's sizes {expected}")
        out.append(_Layer(shape, set(kept.channels.tolist()), set(kept.heads.tolist()), set(kept.kv_groups.tolist()), c))
    return out


def _plan(layers: list[_Layer]) -> RemovalPlan:
    plans = {i: layer.plan() for i, layer in enumerate(layers)}
    return RemovalPlan({i: p for i, p in plans.items() if p != LayerPlan()})


def _round(value: int, candidates: list[int], rounding: Rounding) -> int:
    up = [c for c in candidates if c >= value]
    down = [c for c in candidates if c <= value]
    if rounding == "up":
        return up[0] if up else down[-1]
    if rounding == "down":
        return down[-1] if down else up[0]
    return min(candidates, key=lambda c: (abs(c - value), -c))  # ties round up


def head_unit(multiple: int, head_dim: int) -> int:
    """Fewest heads whose width ``heads * head_dim`` is a multiple of ``multiple``."""
    return multiple // gcd(multiple, head_dim)


def align_plan(
    model: nn.Module,
    adapter: Adapter,
    plan: RemovalPlan,
    multiple: int,
    costs: dict[int, LayerCosts] | None = None,
    rounding: Rounding = "up",
) -> RemovalPlan:
    """Adjust ``plan`` so every layer's kept sizes are multiples of ``multiple``.

    The MLP width becomes a multiple of ``multiple``; the number of KV groups becomes a multiple of
    ``multiple / gcd(multiple, head_dim)``, so the q and k/v widths are multiples too. ``rounding``
    says which multiple: the next one up (bring back the highest-cost removed groups; lossless for a
    masked model), down (remove the lowest-cost kept groups), or the nearest.

    Args:
        model: the model the plan applies to (not yet shrunk).
        adapter: its layout.
        plan: what the pruner would remove.
        multiple: the alignment N (1 changes nothing).
        costs: removal cost per group and layer; default :func:`magnitude_costs`.
        rounding: "up", "down" or "nearest".

    Example:
        >>> aligned = align_plan(model, LLAMA, plan, 16)  # doctest: +SKIP
        >>> shrink_(model, LLAMA, aligned).after[0].intermediate_size % 16  # doctest: +SKIP
        0
    """
    if multiple < 1:
        raise SurgeonError(f"--align must be at least 1, got {multiple}")
    hd = adapter.head_dim(model.config)
    layers = _layers(model, adapter, plan, costs)
    unit = head_unit(multiple, hd)
    for i, layer in enumerate(layers):
        widths = list(range(multiple, layer.shape.intermediate_size + 1, multiple))
        groups = list(range(unit, layer.shape.num_key_value_heads + 1, unit))
        if not widths:
            raise SurgeonError(f"--align {multiple}: layer {i} has only {layer.shape.intermediate_size} MLP channels")
        if not groups:
            raise SurgeonError(
                f"--align {multiple}: layer {i} has {layer.shape.num_key_value_heads} KV heads of size {hd}; "
                f"aligned attention widths need multiples of {unit} KV heads"
            )
        layer.set_channels(_round(len(layer.channels), widths, rounding))
        layer.set_kv_groups(_round(len(layer.kv_groups), groups, rounding), layer.per_group)
    return _plan(layers)


def uniform_plan(
    model: nn.Module,
    adapter: Adapter,
    plan: RemovalPlan,
    costs: dict[int, LayerCosts] | None = None,
    multiple: int = 1,
) -> RemovalPlan:
    """Adjust ``plan`` so every layer keeps the same sizes, valid for the family's stock config.

    Each size is the largest any layer keeps (rounded up to a multiple of ``multiple`` as in
    :func:`align_plan`), raised further where the stock config rejects it (for example, Llama
    requires the heads to divide the hidden size; OPT derives head_dim from the head count, so a
    stock OPT keeps every head). Layers reach it by bringing back their highest-cost removed groups.

    Example:
        >>> same = uniform_plan(model, LLAMA, plan)  # doctest: +SKIP
    """
    if multiple < 1:
        raise SurgeonError(f"--align must be at least 1, got {multiple}")
    hd = adapter.head_dim(model.config)
    layers = _layers(model, adapter, plan, costs)
    unit = head_unit(multiple, hd)
    least = LayerShape(
        min(l.shape.intermediate_size for l in layers),
        min(l.shape.num_attention_heads for l in layers),
        min(l.shape.num_key_value_heads for l in layers),
    )
    width = -(-max(len(l.channels) for l in layers) // multiple) * multiple
    if width > least.intermediate_size:
        raise SurgeonError(
            f"cannot give every layer {width} MLP channels: some layer has only {least.intermediate_size}"
        )
    group = min(l.group for l in layers)
    need_kv = max(len(l.kv_groups) for l in layers)
    need_p = max(l.per_group for l in layers)
    candidates = sorted(
        ((kv, p) for kv in range(need_kv, least.num_key_value_heads + 1) if kv % unit == 0
         for p in range(need_p, group + 1)),
        key=lambda kp: (kp[0] * kp[1], kp[0]),
    )
    config: Any = model.config
    if adapter.head_dim_derived:
        candidates = [kp for kp in candidates if kp[0] * kp[1] == config.num_attention_heads]
    valid = [kp for kp in candidates if _stock_accepts(config, adapter, LayerShape(width, kp[0] * kp[1], kp[0]), hd)]
    if not valid:
        raise SurgeonError(
            f"no uniform head count of at least {need_kv} KV x {need_p} query heads fits every layer and the "
            f"stock {config.model_type} config; give the layers per-layer sizes instead of --uniform"
        )
    kv, per_group = valid[0]
    for layer in layers:
        layer.set_channels(width)
        layer.set_kv_groups(kv, per_group)
    return _plan(layers)


def stock_config(config: Any, adapter: Adapter, shape: LayerShape, head_dim: int) -> Any:
    """The family's stock transformers config with ``shape`` in every layer (SurgeonError if invalid)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    d = config.to_dict()
    stock_type = stock_model_type(str(d.pop("model_type")))
    for key in (*LAYER_FIELDS, "surgeon_format_version", "auto_map", "architectures", "transformers_version"):
        d.pop(key, None)
    d[adapter.intermediate_key] = shape.intermediate_size
    d["num_attention_heads"] = shape.num_attention_heads
    if adapter.grouped_kv:
        d["num_key_value_heads"] = shape.num_key_value_heads
        d["head_dim"] = head_dim
    else:
        d.pop("head_dim", None)
    try:
        out = AutoConfig.for_model(stock_type, **d)
    except (ValueError, TypeError, StrictDataclassError) as exc:
        raise SurgeonError(f"stock {stock_type} config rejects the sizes {shape}: {str(exc).strip().splitlines()[-1]}") from None
    if adapter.head_dim(out) != head_dim:
        raise SurgeonError(f"stock {stock_type} config would use head_dim {adapter.head_dim(out)}, not {head_dim}")
    return out


def _stock_accepts(config: Any, adapter: Adapter, shape: LayerShape, head_dim: int) -> bool:
    try:
        stock_config(config, adapter, shape, head_dim)
    except SurgeonError:
        return False
    return True
