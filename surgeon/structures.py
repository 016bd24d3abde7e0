"""Coupled structures of a decoder layer and their LLM Surgeon costs and updates.

A row or column only shrinks the model when its coupled partners go too (ALGORITHMS.md,
"Structured removal"), so the candidates are coupled groups and a group's cost is the sum of its
members' costs (costs table of ALGORITHMS.md, rows and columns under ``F = G ⊗ A``):

- MLP channel k: row k of gate and up (``½ w A wᵀ / [G⁻¹]_kk`` each), column k of down
  (``½ wᵀ G w / [A⁻¹]_kk``); size ``3 · hidden``.
- Attention slice s: the s-th cheapest query head of *every* KV group, so that all groups keep the
  same size (standard kernels need it); a head's cost is the joint cost of its ``head_dim`` q rows
  plus its ``head_dim`` o columns; RoPE acts within a head, so a head is never split. KV heads stay.

Removed structures are zeroed here (masks and correlated updates); :mod:`surgeon.surgery` turns
zeroed structures into physically smaller matrices.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from surgeon.adapters import Adapter
from surgeon.curvature.kfac import DampedKron
from surgeon.errors import SurgeonError
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


def _layer_names(adapter: Adapter, i: int) -> dict[str, str]:
    p = f"{adapter.layers}.{i}"
    return {
        "q": f"{p}.{adapter.attn}.{adapter.q}", "o": f"{p}.{adapter.attn}.{adapter.o}",
        "gate": f"{p}.{adapter.mlp}.{adapter.gate}", "up": f"{p}.{adapter.mlp}.{adapter.up}",
        "down": f"{p}.{adapter.mlp}.{adapter.down}",
    }


def head_layout(model: nn.Module) -> tuple[int, int, int]:
    """``(n_heads, n_kv_heads, head_dim)`` from the config, with ``head_dim`` never re-derived if given."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_attention_heads, c.num_key_value_heads, head_dim


def head_rows(h: Tensor, head_dim: int) -> Tensor:
    """Row indices of q_proj (or column indices of o_proj) for query heads ``h`` ``[k]`` -> ``[k*head_dim]``."""
    return (h[:, None] * head_dim + torch.arange(head_dim)).flatten()


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
    group_cost: GroupCost = "sum",
) -> tuple[Tensor, Tensor]:
    """Costs of layer ``i``'s MLP channels ``[inter]`` and query heads ``[n_heads]``.

    ``surgeon``: the second-order costs above (needs ``damped`` factors). Baselines on the same
    groups: ``magnitude`` sums the L2 norms of a group's rows and columns; ``wanda`` scores the
    output-side matrix like Wanda, ``‖W[:, j]‖ · ‖x_j‖`` summed over the group's columns of
    down_proj / o_proj (needs the input moments ``A``).
    """
    names = _layer_names(adapter, i)
    W = {k: adapter_weight(model, n) for k, n in names.items()}
    n_heads, _, head_dim = head_layout(model)
    if scoring == "surgeon":
        assert damped is not None
        dq, do = damped[names["q"]], damped[names["o"]]
        channels = col_costs(W["down"], damped[names["down"]].G, damped[names["down"]].A_inv)
        heads = torch.stack([cols_cost(W["o"], do.G, do.A_inv, head_rows(torch.tensor([h]), head_dim))
                             for h in range(n_heads)])
        if group_cost == "sum":
            channels = channels + (
                row_costs(W["gate"], damped[names["gate"]].A, damped[names["gate"]].G_inv)
                + row_costs(W["up"], damped[names["up"]].A, damped[names["up"]].G_inv)
            )
            heads = heads + torch.stack([rows_cost(W["q"], dq.A, dq.G_inv, head_rows(torch.tensor([h]), head_dim))
                                         for h in range(n_heads)])
    elif scoring == "magnitude":
        channels = W["gate"].norm(dim=1) + W["up"].norm(dim=1) + W["down"].norm(dim=0)
        heads = (W["q"].reshape(n_heads, -1).norm(dim=1)
                 + W["o"].reshape(W["o"].shape[0], n_heads, head_dim).permute(1, 0, 2).reshape(n_heads, -1).norm(dim=1))
    else:
        assert A is not None
        down = W["down"].norm(dim=0) * A[names["down"]].diagonal().sqrt()  # [inter]
        o = W["o"].norm(dim=0) * A[names["o"]].diagonal().sqrt()  # [n_heads * head_dim]
        channels, heads = down, o.reshape(n_heads, head_dim).sum(1)
    return channels, heads


def layer_candidates(
    model: nn.Module, adapter: Adapter, i: int, channel_cost: Tensor, head_cost: Tensor,
    keep: dict[str, Tensor], min_channels: int,
) -> list[Candidate]:
    """Every coupled group of layer ``i`` that may still go, with its cost (already removed ones first)."""
    names = _layer_names(adapter, i)
    hidden = model.get_submodule(names["gate"]).in_features
    gone = ~keep[names["gate"]].any(1)  # channels already removed
    ch = torch.where(gone, -1.0, channel_cost.double())
    order = ch.argsort()
    out = [Candidate(i, "channel", order[j : j + 1], float(ch[order[j]]), 3 * hidden)
           for j in range(len(order) - min_channels)]
    n_heads, n_kv, head_dim = head_layout(model)
    group = n_heads // n_kv
    heads_gone = ~keep[names["q"]].reshape(n_heads, head_dim, -1).any(2).any(1)
    hc = torch.where(heads_gone, -1.0, head_cost.double()).reshape(n_kv, group)  # [kv group, head in group]
    ranked = hc.argsort(dim=1)  # cheapest first within each group
    for s in range(group - 1):  # keep at least one query head per KV group
        heads = ranked[:, s] + torch.arange(n_kv) * group
        cost = float(hc.gather(1, ranked[:, s : s + 1]).clamp(min=0).sum())
        out.append(Candidate(i, "heads", heads, cost if not heads_gone[heads].all() else -1.0,
                             2 * n_kv * head_dim * hidden))
    return out


def adapter_weight(model: nn.Module, name: str) -> Tensor:
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
    structures are only zeroed.
    """
    rows_damped = damped if group_cost == "sum" else None
    _, _, head_dim = head_layout(model)
    by_layer: dict[int, dict[str, list[Tensor]]] = {}
    for c in chosen:
        by_layer.setdefault(c.layer, {"channel": [], "heads": []})[c.kind].append(c.index)
    with torch.no_grad():
        for i, parts in by_layer.items():
            names = _layer_names(adapter, i)
            if parts["channel"]:
                R = torch.cat(parts["channel"]).unique()
                for key in ("gate", "up"):
                    _remove(model, names[key], R, "rows", rows_damped, keep)
                _remove(model, names["down"], R, "cols", damped, keep)
            if parts["heads"]:
                idx = head_rows(torch.cat(parts["heads"]).unique(), head_dim)
                _remove(model, names["q"], idx, "rows", rows_damped, keep)
                _remove(model, names["o"], idx, "cols", damped, keep)


def _remove(
    model: nn.Module, name: str, idx: Tensor, axis: Literal["rows", "cols"],
    damped: Mapping[str, DampedKron] | None, keep: dict[str, Tensor],
) -> None:
    W = adapter_weight(model, name)
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
    if not torch.isfinite(W).all():
        raise FloatingPointError(f"non-finite weights after the structured update of {name}")
    weight = model.get_submodule(name).weight
    weight.copy_(W.to(weight.dtype))


def check_supported(model: nn.Module, adapter: Adapter) -> None:
    """Structured pruning needs gated MLPs and whole KV groups; say so clearly otherwise."""
    n_heads, n_kv, _ = head_layout(model)
    if n_heads % n_kv:
        raise SurgeonError(f"{n_heads} query heads do not split evenly into {n_kv} KV groups")
    if n_heads // n_kv < 2:
        raise SurgeonError("structured pruning needs at least 2 query heads per KV group")
    layer = adapter.decoder_layers(model)[0]
    for name in adapter.linear_names:
        layer.get_submodule(name)
