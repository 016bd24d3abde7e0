"""Coupled structures of a decoder layer and their LLM Surgeon costs and updates.

A row or column only shrinks the model when its coupled partners go too (ALGORITHMS.md,
"Structured removal"), so the candidates are coupled groups and a group's cost is the sum of its
members' costs (costs table of ALGORITHMS.md, rows and columns under ``F = G ⊗ A``). Which linears
form each group comes from the family's adapter (:mod:`base.adapters`), never from names here:

- MLP channel k: row k of every channel-row linear (gate and up; OPT's fc1) (``½ w A wᵀ / [G⁻¹]_kk``
  each), column k of down (fc2) (``½ wᵀ G w / [A⁻¹]_kk``); size ``(rows + 1) · hidden``.
- Attention slice s: the s-th cheapest query head of *every* KV group, so that all groups keep the
  same size (standard kernels need it); a head's cost is the joint cost of its ``head_dim`` q rows
  plus its ``head_dim`` o columns; RoPE acts within a head, so a head is never split. KV heads stay
  where they are shared (grouped-query attention); without GQA (one KV head per query head, OPT) a
  head is its own KV group, and removing it takes its k and v rows too.

Removed structures are zeroed here (masks and correlated updates); :func:`removal_plan` says which
groups went, and :mod:`base.surgery` cuts them into physically smaller matrices.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from base.adapters import Adapter
from base.errors import SurgeonError
from base.integrity import all_finite
from base.surgery import LayerPlan, RemovalPlan, head_rows
from surgeon.curvature.kfac import DampedKron
from surgeon.prune.costs import col_costs, cols_cost, row_costs, rows_cost
from surgeon.prune.update import update_cols, update_rows


@dataclass
class Candidate:
    """One removable coupled group: where it is, what it costs, how many weights it holds."""

    layer: int
    kind: str  # "channel" or "heads"
    index: Tensor  # channel index [1], or the query-head indices of the slice [n_kv_heads]
    cost: float
    size: int


@dataclass(frozen=True)
class LayerNames:
    """Full module names of one layer's coupled linears, from the family's adapter."""

    q: str  # rows in query heads
    kv: tuple[str, ...]  # rows in KV heads (k, v)
    o: str  # columns in query heads
    channel_rows: tuple[str, ...]  # rows in MLP channels (gate and up; OPT's fc1)
    down: str  # columns in MLP channels (down; OPT's fc2)

    @classmethod
    def of(cls, adapter: Adapter, i: int) -> LayerNames:
        p = f"{adapter.layers}.{i}"
        return cls(f"{p}.{adapter.head_rows[0]}", tuple(f"{p}.{n}" for n in adapter.kv_rows),
                   f"{p}.{adapter.head_cols[0]}", tuple(f"{p}.{n}" for n in adapter.channel_rows),
                   f"{p}.{adapter.channel_cols[0]}")


Scoring = Literal["surgeon", "magnitude", "wanda"]
# "sum": a group's cost is the sum of its members' costs and every member gets its K-FAC update
# (ALGORITHMS.md read literally). "output": only the output-side member counts and moves (down_proj
# columns, o_proj columns): once a channel's down_proj column is gone its gate/up rows no longer
# reach the loss, so their costs are counted twice and their G-correlated row updates move live
# channels to make up for a change that has no effect. The input-side rows are just zeroed.
GroupCost = Literal["sum", "output"]


def group_costs(
    model: nn.Module, adapter: Adapter, i: int, scoring: Scoring,
    damped: Mapping[str, DampedKron] | None = None, A: dict[str, Tensor] | None = None,
    group_cost: GroupCost = "sum", parts: tuple[str, ...] = ("channel", "heads"),
) -> tuple[Tensor | None, Tensor | None]:
    """Costs of layer ``i``'s MLP channels ``[inter]`` and query heads ``[n_heads]`` (None for a kind not in
    ``parts``: with LLM Surgeon's scores, another rank's share of the layer's work).

    ``surgeon``: the second-order costs above (needs ``damped`` factors). Baselines on the same
    groups: ``magnitude`` sums the L2 norms of a group's rows and columns; ``wanda`` scores the
    output-side matrix like Wanda, ``‖W[:, j]‖ · ‖x_j‖`` summed over the group's columns of
    down / o (needs the input moments ``A``).
    """
    names = LayerNames.of(adapter, i)
    W_q, W_o, W_down = (weight(model, n) for n in (names.q, names.o, names.down))
    W_rows = [weight(model, n) for n in names.channel_rows]
    n_heads, _, head_dim = adapter.head_layout(model.config)
    if scoring == "surgeon":
        assert damped is not None
        channels = heads = None  # the factors (and their inverses) of a kind are touched only where asked
        if "channel" in parts:
            dd = damped[names.down]
            channels = col_costs(W_down, dd.G, dd.A_inv)
            if group_cost == "sum":
                for name, W in zip(names.channel_rows, W_rows):
                    channels = channels + row_costs(W, damped[name].A, damped[name].G_inv)
        if "heads" in parts:
            do = damped[names.o]
            heads = torch.stack([cols_cost(W_o, do.G, do.A_inv, head_rows(torch.tensor([h]), head_dim))
                                 for h in range(n_heads)])
            if group_cost == "sum":
                dq = damped[names.q]
                heads = heads + torch.stack([rows_cost(W_q, dq.A, dq.G_inv, head_rows(torch.tensor([h]), head_dim))
                                             for h in range(n_heads)])
    elif scoring == "magnitude":
        channels = sum(W.norm(dim=1) for W in W_rows) + W_down.norm(dim=0)
        heads = (W_q.reshape(n_heads, -1).norm(dim=1)
                 + W_o.reshape(W_o.shape[0], n_heads, head_dim).permute(1, 0, 2).reshape(n_heads, -1).norm(dim=1))
    else:
        assert A is not None
        channels = W_down.norm(dim=0) * A[names.down].diagonal().sqrt()  # [inter]
        o = W_o.norm(dim=0) * A[names.o].diagonal().sqrt()  # [n_heads * head_dim]
        heads = o.reshape(n_heads, head_dim).sum(1)
    return channels, heads  # type: ignore[return-value]


def layer_candidates(
    model: nn.Module, adapter: Adapter, i: int, channel_cost: Tensor, head_cost: Tensor,
    keep: dict[str, Tensor], min_channels: int,
) -> list[Candidate]:
    """Every coupled group of layer ``i`` that may still go, with its cost (already removed ones first).

    Floors: ``min_channels`` MLP channels, one query head per KV group, and (without GQA, where a
    head is its own KV group) one head per layer.
    """
    names = LayerNames.of(adapter, i)
    hidden = model.get_submodule(names.channel_rows[0]).in_features
    gone = ~keep[names.channel_rows[0]].any(1)  # channels already removed
    ch = torch.where(gone, -1.0, channel_cost.double())
    order = ch.argsort()
    channel_size = (len(names.channel_rows) + 1) * hidden
    out = [Candidate(i, "channel", order[j : j + 1], float(ch[order[j]]), channel_size)
           for j in range(len(order) - min_channels)]
    n_heads, n_kv, head_dim = adapter.head_layout(model.config)
    group = n_heads // n_kv
    heads_gone = ~keep[names.q].reshape(n_heads, head_dim, -1).any(2).any(1)
    hc = torch.where(heads_gone, -1.0, head_cost.double())
    if group == 1:  # each head is its own KV group: q, k, v rows and o columns go together
        ranked = hc.argsort()
        out += [Candidate(i, "heads", ranked[j : j + 1], float(hc[ranked[j]]), 4 * head_dim * hidden)
                for j in range(n_heads - 1)]
        return out
    hc = hc.reshape(n_kv, group)  # [kv group, head in group]
    ranked = hc.argsort(dim=1)  # cheapest first within each group
    for s in range(group - 1):  # keep at least one query head per KV group
        heads = ranked[:, s] + torch.arange(n_kv) * group
        cost = float(hc.gather(1, ranked[:, s : s + 1]).clamp(min=0).sum())
        out.append(Candidate(i, "heads", heads, cost if not heads_gone[heads].all() else -1.0,
                             2 * n_kv * head_dim * hidden))
    return out


def weight(model: nn.Module, name: str) -> Tensor:
    return model.get_submodule(name).weight.detach().double()


def select(candidates: list[Candidate], budget: int) -> list[Candidate]:
    """The cheapest candidates, by cost per weight, until ``budget`` weights are removed.

    Sizes differ (a channel holds ``3·hidden`` weights, a head slice far more), so candidates are
    ranked by cost per weight, the greedy answer to this knapsack; already removed ones come first.
    """
    # A layer's slice s costs at least as much as slice s-1 (same size), so the stable sort
    # keeps them in order and no slice is taken before the ones cheaper than it.
    ranked = sorted(candidates, key=lambda c: c.cost / c.size)
    chosen: list[Candidate] = []
    removed = 0
    for c in ranked:
        if removed >= budget:
            break
        chosen.append(c)
        removed += c.size
    if removed < budget:
        raise SurgeonError("structured target cannot be reached under the per-layer floors")
    return chosen


def apply_(
    model: nn.Module, adapter: Adapter, chosen: list[Candidate], damped: Mapping[str, DampedKron] | None,
    keep: dict[str, Tensor], group_cost: GroupCost = "sum",
) -> None:
    """Zero the chosen structures and update the masks.

    With ``damped`` factors the remaining weights get LLM Surgeon's joint (correlated) row and
    column updates (``group_cost="output"``: column updates only); without (the baselines), the
    structures are only zeroed. Without GQA a removed head's k and v rows are zeroed too.
    """
    rows_damped = damped if group_cost == "sum" else None
    n_heads, n_kv, head_dim = adapter.head_layout(model.config)
    by_layer: dict[int, dict[str, list[Tensor]]] = {}
    for c in chosen:
        by_layer.setdefault(c.layer, {"channel": [], "heads": []})[c.kind].append(c.index)
    with torch.no_grad():
        for i, parts in by_layer.items():
            names = LayerNames.of(adapter, i)
            if parts["channel"]:
                R = torch.cat(parts["channel"]).unique()
                for name in names.channel_rows:
                    _remove(model, name, R, "rows", rows_damped, keep)
                _remove(model, names.down, R, "cols", damped, keep)
            if parts["heads"]:
                idx = head_rows(torch.cat(parts["heads"]).unique(), head_dim)
                _remove(model, names.q, idx, "rows", rows_damped, keep)
                _remove(model, names.o, idx, "cols", damped, keep)
                if n_heads == n_kv:
                    for name in names.kv:
                        _remove(model, name, idx, "rows", None, keep)


def removal_plan(model: nn.Module, adapter: Adapter, keep: Mapping[str, Tensor]) -> RemovalPlan:
    """The groups the masks ``keep`` removed, per layer: what the smaller checkpoint is cut by."""
    plan = RemovalPlan()
    for i in range(len(adapter.decoder_layers(model))):
        layer = layer_removal(model.config, adapter, i, keep)
        if layer is not None:
            plan.layers[i] = layer
    return plan


def layer_removal(config: object, adapter: Adapter, i: int, keep: Mapping[str, Tensor]) -> LayerPlan | None:
    """The groups layer ``i``'s masks removed (None: none); ``keep`` needs only that layer's masks.

    A channel is removed when none of its channel-row weights is kept, a query head when none of
    its q rows is; without GQA such a head is a whole KV group and is recorded as one.
    """
    n_heads, n_kv, head_dim = adapter.head_layout(config)
    names = LayerNames.of(adapter, i)
    channels = torch.nonzero(~keep[names.channel_rows[0]].any(1)).flatten().tolist()
    heads = torch.nonzero(~keep[names.q].reshape(n_heads, head_dim, -1).any(2).any(1)).flatten().tolist()
    if not channels and not heads:
        return None
    return (LayerPlan.of(channels=channels, kv_groups=heads) if n_heads == n_kv
            else LayerPlan.of(channels=channels, heads=heads))


def _remove(
    model: nn.Module, name: str, idx: Tensor, axis: Literal["rows", "cols"],
    damped: Mapping[str, DampedKron] | None, keep: dict[str, Tensor],
) -> None:
    W = weight(model, name)
    if damped is None:
        W = W.clone()
        if axis == "rows":
            W[idx] = 0.0
        else:
            W[:, idx] = 0.0
    elif axis == "rows":
        W = update_rows(W, damped[name].G_inv, idx)
    else:
        W = update_cols(W, damped[name].A_inv, idx)
    _set(model, name, W)
    if axis == "rows":
        keep[name][idx] = False
    else:
        keep[name][:, idx] = False


def _set(model: nn.Module, name: str, W: Tensor) -> None:
    if not all_finite(W):
        raise FloatingPointError(f"non-finite weights after the structured update of {name}")
    param = model.get_submodule(name).weight
    param.copy_(W.to(param.dtype))


def check_supported(model: nn.Module, adapter: Adapter) -> None:
    """Structured pruning needs whole KV groups; say so clearly otherwise."""
    n_heads, n_kv, _ = adapter.head_layout(model.config)
    if n_heads % n_kv:
        raise SurgeonError(f"{n_heads} query heads do not split evenly into {n_kv} KV groups")
    layer = adapter.decoder_layers(model)[0]
    for name in adapter.linear_names:
        adapter.linear(layer, name)
