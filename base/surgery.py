"""The one place that changes a tensor's shape: structured removal in decoder layers.

ALGORITHMS.md, "Structured removal in a decoder layer": a row or column only shrinks the model
when its coupled partners go too, so removal works on coupled groups:

- MLP channel ``c``: row ``c`` of gate and up (OPT: fc1) and column ``c`` of down (fc2);
- query head ``h``: rows ``h*d:(h+1)*d`` of q and the same columns of o (``d = head_dim``);
- key/value group ``g``: the rows of k and v for ``g`` plus every query head of ``g``'s group.
  Query heads alone may only be removed in equal numbers from every kept group, because the
  attention kernels repeat each KV head for a fixed number of query heads.

Heads are never split (rotary embeddings act within a head) and the hidden size is never cut. The
primitives :func:`drop_rows_`/:func:`drop_cols_` update weight, bias and ``out_features``/
``in_features`` together; :func:`shrink_` applies a :class:`RemovalPlan` to a whole model, updates
each layer's attention/MLP attributes and the config's per-layer sizes in the same call, and
returns a :class:`ShapeManifest`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from base.adapters import Adapter
from base.errors import SurgeonError
from base.modeling import LayerShape, layer_fields


@dataclass(frozen=True)
class LayerPlan:
    """Groups to remove from one layer, numbered as in the layer before removal.

    ``heads`` are query heads (0..n_heads-1); ``kv_groups`` are key/value heads (0..n_kv-1) and
    take all their query heads with them. Without grouped-query attention (one query head per KV
    head, as in OPT) the two numberings coincide and either list removes the whole head.
    """

    channels: tuple[int, ...] = ()
    heads: tuple[int, ...] = ()
    kv_groups: tuple[int, ...] = ()

    @classmethod
    def of(cls, channels: Iterable[int] = (), heads: Iterable[int] = (), kv_groups: Iterable[int] = ()) -> LayerPlan:
        """A plan from any iterables of indices (sorted, duplicates dropped)."""
        return cls(*(tuple(sorted({int(i) for i in x})) for x in (channels, heads, kv_groups)))

    def to_dict(self) -> dict[str, list[int]]:
        return {"channels": list(self.channels), "heads": list(self.heads), "kv_groups": list(self.kv_groups)}


@dataclass
class RemovalPlan:
    """What to remove from each layer (layer index -> :class:`LayerPlan`; absent layers stay)."""

    layers: dict[int, LayerPlan] = field(default_factory=dict)

    def get(self, index: int) -> LayerPlan:
        return self.layers.get(index, LayerPlan())

    def to_dict(self) -> dict[str, dict[str, list[int]]]:
        return {str(i): p.to_dict() for i, p in sorted(self.layers.items())}

    @classmethod
    def from_dict(cls, data: dict) -> RemovalPlan:
        return cls({int(i): LayerPlan.of(**p) for i, p in data.items()})


@dataclass
class LayerCosts:
    """Cost of removing each group of one layer, e.g. LLM Surgeon's ΔL (higher: worse to remove).

    ``channels`` is ``[intermediate_size]``, ``heads`` is ``[n_heads]``, ``kv_groups`` is ``[n_kv]``
    (the cost of a KV group's own k/v rows; its query heads' costs are added where needed).
    """

    channels: Tensor
    heads: Tensor
    kv_groups: Tensor


@dataclass(frozen=True)
class Kept:
    """Indices a layer keeps after a plan, checked against the coupling rules."""

    channels: Tensor  # [I'] long
    heads: Tensor  # [n'] long
    kv_groups: Tensor  # [n_kv'] long

    @property
    def shape(self) -> LayerShape:
        return LayerShape(len(self.channels), len(self.heads), len(self.kv_groups))


@dataclass
class ShapeManifest:
    """Per-layer sizes before and after :func:`shrink_`, with what was removed."""

    head_dim: int
    before: list[LayerShape]
    after: list[LayerShape]
    removed: RemovalPlan

    def to_dict(self) -> dict:
        return {
            "head_dim": self.head_dim,
            "layers": [
                {**after.to_dict(), "before": before.to_dict(), "removed": self.removed.get(i).to_dict()}
                for i, (before, after) in enumerate(zip(self.before, self.after))
            ],
        }


def drop_rows_(linear: nn.Linear, idx: Tensor | Iterable[int]) -> None:
    """Remove output rows ``idx`` of ``linear`` (weight rows and bias entries), in place.

    Args:
        linear: the layer; its weight is ``[out, in]``.
        idx: row indices to remove.

    Example:
        >>> lin = nn.Linear(3, 4)
        >>> drop_rows_(lin, [0, 2]); lin.weight.shape, lin.out_features
        (torch.Size([2, 3]), 2)
    """
    keep = _complement(idx, linear.out_features, linear.weight.device)
    with torch.no_grad():
        linear.weight = nn.Parameter(linear.weight.index_select(0, keep).contiguous(), linear.weight.requires_grad)
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.index_select(0, keep).contiguous(), linear.bias.requires_grad)
    linear.out_features = len(keep)
    assert linear.weight.shape == (linear.out_features, linear.in_features)


def drop_cols_(linear: nn.Linear, idx: Tensor | Iterable[int]) -> None:
    """Remove input columns ``idx`` of ``linear``, in place (the bias is per output: unchanged).

    Example:
        >>> lin = nn.Linear(3, 4)
        >>> drop_cols_(lin, [1]); lin.weight.shape, lin.in_features
        (torch.Size([4, 2]), 2)
    """
    keep = _complement(idx, linear.in_features, linear.weight.device)
    with torch.no_grad():
        linear.weight = nn.Parameter(linear.weight.index_select(1, keep).contiguous(), linear.weight.requires_grad)
    linear.in_features = len(keep)
    assert linear.weight.shape == (linear.out_features, linear.in_features)


def _complement(idx: Tensor | Iterable[int], size: int, device: torch.device) -> Tensor:
    drop = torch.zeros(size, dtype=torch.bool)
    drop[torch.as_tensor(list(idx) if not isinstance(idx, Tensor) else idx, dtype=torch.long)] = True
    return torch.nonzero(~drop).flatten().to(device)


def head_rows(heads: Tensor, head_dim: int) -> Tensor:
    """Row (or column) indices of whole heads: head ``h`` owns ``h*head_dim .. (h+1)*head_dim-1``."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()  # [len(heads) * head_dim]


def layer_shapes(model: nn.Module, adapter: Adapter) -> list[LayerShape]:
    """The sizes of every decoder layer, read from the linears themselves (never from the config)."""
    hd = adapter.head_dim(model.config)
    shapes = []
    for layer in adapter.decoder_layers(model):
        q = adapter.linear(layer, adapter.head_rows[0])
        k = adapter.linear(layer, adapter.kv_rows[0])
        down = adapter.linear(layer, adapter.channel_cols[0])
        shapes.append(LayerShape(down.in_features, q.out_features // hd, k.out_features // hd))
    return shapes


def resolve(shape: LayerShape, plan: LayerPlan, index: int = 0) -> Kept:
    """What a layer of ``shape`` keeps under ``plan``; errors name the layer and the rule broken.

    Example:
        >>> kept = resolve(LayerShape(8, 4, 2), LayerPlan.of(channels=[0], kv_groups=[1]))
        >>> kept.shape
        LayerShape(intermediate_size=7, num_attention_heads=2, num_key_value_heads=1)
    """
    n, n_kv, width = shape.num_attention_heads, shape.num_key_value_heads, shape.intermediate_size
    for name, values, size in (("MLP channel", plan.channels, width), ("query head", plan.heads, n),
                               ("KV group", plan.kv_groups, n_kv)):
        bad = [i for i in values if not 0 <= i < size]
        if bad:
            raise SurgeonError(f"layer {index}: {name} {bad[0]} out of range (the layer has {size})")
    group = n // n_kv
    drop_kv = set(plan.kv_groups) | (set(plan.heads) if group == 1 else set())
    drop_heads = set(plan.heads) | {h for g in drop_kv for h in range(g * group, (g + 1) * group)}
    keep_heads = [h for h in range(n) if h not in drop_heads]
    keep_kv = [g for g in range(n_kv) if g not in drop_kv]
    drop_channels = set(plan.channels)
    keep_channels = [c for c in range(width) if c not in drop_channels]
    if not keep_channels:
        raise SurgeonError(
            f"layer {index}: the plan removes all {width} MLP channels; keep at least one "
            "(removing a whole MLP is not supported)"
        )
    if not keep_kv:
        raise SurgeonError(
            f"layer {index}: the plan removes every attention head; keep at least one KV group "
            "(removing a whole attention block is not supported)"
        )
    per_group = [sum(1 for h in keep_heads if h // group == g) for g in keep_kv]
    if len(set(per_group)) != 1 or per_group[0] == 0:
        raise SurgeonError(
            f"layer {index}: query heads must be removed evenly from every kept KV group "
            f"(kept per group: {per_group}); remove whole KV groups instead"
        )
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return Kept(as_long(keep_channels), as_long(keep_heads), as_long(keep_kv))


def shrink_(model: nn.Module, adapter: Adapter, plan: RemovalPlan) -> ShapeManifest:
    """Remove the planned groups from ``model`` in place; returns the per-layer shape manifest.

    Every layer's plan is checked before anything changes. Afterwards the linears, the attention
    and MLP attributes (e.g. ``num_key_value_groups``) and ``model.config``'s per-layer lists
    (``layer_intermediate_sizes``, ``layer_num_attention_heads``, ``layer_num_key_value_heads``,
    with ``head_dim`` explicit) all describe the smaller model. Removing groups whose
    contribution is exactly zero leaves the logits unchanged.

    Args:
        model: a causal LM of a family ``adapter`` describes (stock or ``surgeon_*``).
        adapter: its layout.
        plan: groups to remove per layer, numbered as in the model before this call.

    Example:
        >>> manifest = shrink_(model, LLAMA, RemovalPlan({0: LayerPlan.of(channels=[3, 5])}))  # doctest: +SKIP
        >>> manifest.after[0].intermediate_size  # doctest: +SKIP
        62
    """
    layers = adapter.decoder_layers(model)
    bad = [i for i in plan.layers if not 0 <= i < len(layers)]
    if bad:
        raise SurgeonError(f"plan names layer {bad[0]}, but the model has {len(layers)} layers")
    hd = adapter.head_dim(model.config)
    before = layer_shapes(model, adapter)
    kept = {i: resolve(before[i], p, i) for i, p in plan.layers.items()}
    for i, k in kept.items():
        _shrink_layer_(layers[i], adapter, k, hd)
    after = layer_shapes(model, adapter)
    for i, k in kept.items():
        assert after[i] == k.shape, f"layer {i}: expected {k.shape}, got {after[i]}"
    set_config_shapes(model.config, after, hd)
    return ShapeManifest(head_dim=hd, before=before, after=after, removed=plan)


def _shrink_layer_(layer: nn.Module, adapter: Adapter, kept: Kept, head_dim: int) -> None:
    width = adapter.linear(layer, adapter.channel_cols[0]).in_features
    drop_channels = _complement(kept.channels, width, torch.device("cpu"))
    for name in adapter.channel_rows:
        drop_rows_(adapter.linear(layer, name), drop_channels)
    for name in adapter.channel_cols:
        drop_cols_(adapter.linear(layer, name), drop_channels)
    mlp = adapter.mlp_module(layer)
    if adapter.mlp_width_attr is not None:
        setattr(mlp, adapter.mlp_width_attr, len(kept.channels))

    q = adapter.linear(layer, adapter.head_rows[0])
    k = adapter.linear(layer, adapter.kv_rows[0])
    drop_heads = _complement(kept.heads, q.out_features // head_dim, torch.device("cpu"))
    drop_kv = _complement(kept.kv_groups, k.out_features // head_dim, torch.device("cpu"))
    for name in adapter.head_rows:
        drop_rows_(adapter.linear(layer, name), head_rows(drop_heads, head_dim))
    for name in adapter.kv_rows:
        drop_rows_(adapter.linear(layer, name), head_rows(drop_kv, head_dim))
    for name in adapter.head_cols:
        drop_cols_(adapter.linear(layer, name), head_rows(drop_heads, head_dim))
    attn = adapter.attention(layer)
    if adapter.kv_groups_attr is not None:
        setattr(attn, adapter.kv_groups_attr, len(kept.heads) // len(kept.kv_groups))
    if adapter.heads_attr is not None:
        setattr(attn, adapter.heads_attr, len(kept.heads))


def place_rows_(linear: nn.Linear, positions: Tensor, size: int) -> None:
    """Grow ``linear`` to ``size`` output rows: old row ``r`` moves to ``positions[r]``, new rows are zero.

    The inverse of :func:`drop_rows_` with zeros where rows were removed: a zero row (and bias)
    gives a zero output, so whatever reads it sees nothing new.
    """
    with torch.no_grad():
        W = linear.weight.new_zeros(size, linear.in_features)
        W[positions.to(W.device)] = linear.weight
        linear.weight = nn.Parameter(W, linear.weight.requires_grad)
        if linear.bias is not None:
            b = linear.bias.new_zeros(size)
            b[positions.to(b.device)] = linear.bias
            linear.bias = nn.Parameter(b, linear.bias.requires_grad)
    linear.out_features = size


def place_cols_(linear: nn.Linear, positions: Tensor, size: int) -> None:
    """Grow ``linear`` to ``size`` input columns: old column ``c`` moves to ``positions[c]``, new ones are zero."""
    with torch.no_grad():
        W = linear.weight.new_zeros(linear.out_features, size)
        W[:, positions.to(W.device)] = linear.weight
        linear.weight = nn.Parameter(W, linear.weight.requires_grad)
    linear.in_features = size


def grow_(model: nn.Module, adapter: Adapter, target: LayerShape) -> list[LayerShape]:
    """Pad every decoder layer to ``target`` sizes with zero groups, in place; returns the sizes before.

    The groups added contribute exactly nothing: a new MLP channel has zero gate/up rows and a zero
    down column; a new query head has zero q rows and a zero o column; a new KV group has zero k and v
    rows and only new (zero-o-column) query heads, so its attention output, whatever its weights, is
    multiplied by zeros. Existing heads keep their KV group: query head ``j`` of group ``g`` moves to
    ``g * group' + j`` with ``group'`` the target's query heads per KV group. Used to bring a
    per-layer checkpoint back to a common shape before :func:`export.shapes.uniform_plan` picks the
    uniform sizes (the outputs are unchanged up to float summation order in the padded matmuls).
    """
    hd = adapter.head_dim(model.config)
    before = layer_shapes(model, adapter)
    group_t = target.num_attention_heads // target.num_key_value_heads
    for i, (layer, shape) in enumerate(zip(adapter.decoder_layers(model), before)):
        group = shape.num_attention_heads // shape.num_key_value_heads
        if (shape.intermediate_size > target.intermediate_size or shape.num_key_value_heads > target.num_key_value_heads
                or group > group_t):
            raise SurgeonError(f"layer {i} ({shape}) does not fit in {target}")
        channels = torch.arange(shape.intermediate_size)
        for name in adapter.channel_rows:
            place_rows_(adapter.linear(layer, name), channels, target.intermediate_size)
        for name in adapter.channel_cols:
            place_cols_(adapter.linear(layer, name), channels, target.intermediate_size)
        heads = torch.arange(shape.num_attention_heads)
        head_pos = head_rows((heads // group) * group_t + heads % group, hd)
        kv_pos = head_rows(torch.arange(shape.num_key_value_heads), hd)
        for name in adapter.head_rows:
            place_rows_(adapter.linear(layer, name), head_pos, target.num_attention_heads * hd)
        for name in adapter.kv_rows:
            place_rows_(adapter.linear(layer, name), kv_pos, target.num_key_value_heads * hd)
        for name in adapter.head_cols:
            place_cols_(adapter.linear(layer, name), head_pos, target.num_attention_heads * hd)
        if adapter.mlp_width_attr is not None:
            setattr(adapter.mlp_module(layer), adapter.mlp_width_attr, target.intermediate_size)
        attn = adapter.attention(layer)
        if adapter.kv_groups_attr is not None:
            setattr(attn, adapter.kv_groups_attr, group_t)
        if adapter.heads_attr is not None:
            setattr(attn, adapter.heads_attr, target.num_attention_heads)
    set_config_shapes(model.config, layer_shapes(model, adapter), hd)
    return before


def set_config_shapes(config: object, shapes: list[LayerShape], head_dim: int) -> None:
    """Record per-layer sizes (and an explicit ``head_dim``) on a config, as base/modeling.py reads them."""
    config.head_dim = head_dim  # type: ignore[attr-defined]
    for field_name, value in layer_fields(shapes).items():
        setattr(config, field_name, value)


@torch.no_grad()
def zero_groups_(model: nn.Module, adapter: Adapter, plan: RemovalPlan) -> None:
    """Zero the planned groups in place without changing any shape (the masked model).

    Every member of each removed group is zeroed (weight rows or columns and bias entries), as a
    structured pruner that only masks would leave them; :func:`shrink_` on the same plan then
    leaves the logits unchanged.
    """
    layers = adapter.decoder_layers(model)
    hd = adapter.head_dim(model.config)
    shapes = layer_shapes(model, adapter)
    for i, p in plan.layers.items():
        kept = resolve(shapes[i], p, i)
        layer = layers[i]
        channels = _complement(kept.channels, shapes[i].intermediate_size, torch.device("cpu"))
        heads = head_rows(_complement(kept.heads, shapes[i].num_attention_heads, torch.device("cpu")), hd)
        kv = head_rows(_complement(kept.kv_groups, shapes[i].num_key_value_heads, torch.device("cpu")), hd)
        for names, idx, dim in ((adapter.channel_rows, channels, 0), (adapter.channel_cols, channels, 1),
                                (adapter.head_rows, heads, 0), (adapter.kv_rows, kv, 0), (adapter.head_cols, heads, 1)):
            for name in names:
                linear = adapter.linear(layer, name)
                linear.weight.index_fill_(dim, idx.to(linear.weight.device), 0.0)
                if dim == 0 and linear.bias is not None:
                    linear.bias.index_fill_(0, idx.to(linear.bias.device), 0.0)
