"""LLM Surgeon: multi-shot pruning with Kronecker-factored curvature and global allocation.

van der Ouderaa et al., "The LLM Surgeon", ICLR 2024 (arXiv 2312.17244); ALGORITHMS.md. Every shot:

1. estimate ``A`` and ``G`` of every decoder linear on the current (already pruned and updated)
   model with forward and backward passes of the LM loss (:func:`surgeon.calibrate.kfac_factors`);
2. rescale, damp and invert the factors (:func:`surgeon.curvature.kfac.prepare`);
3. compute every candidate's removal cost ``ΔL`` (elements, or coupled structures), compare them
   across all layers, and remove the cheapest until this shot's target (linear schedule);
4. apply the correlated weight update for what was removed and freeze the masks.

Targets: unstructured (fraction of the decoder-linear weights), N:M (2:4), structured (coupled
MLP channels and attention heads; :mod:`surgeon.structures`), and structured followed by N:M.

Steps 3-4 are per-layer functions (:func:`element_prune_`, :func:`layer_candidates`,
:func:`surgeon.prune.threshold.global_threshold`), so :mod:`surgeon.streamed_surgeon` runs the same
shots with the curvature collected one layer at a time, for a model larger than memory.

Data-parallel (:mod:`base.distributed`): K-FAC's passes run each rank's batches of the windows
and ``A``, ``G`` add every rank's batches in their global order (bit-identical to one process);
each linear's costs and update (each layer's group costs and updates, structured) are computed by
the rank :func:`~base.distributed.assign` gives it and broadcast (global allocation shares every
cost, then all ranks select alike); rank 0 alone writes the checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from base.adapters import Adapter
from base.distributed import assign, broadcast_json, is_main, rank, share
from base.errors import SurgeonError
from base.formats import dtype_name
from base.integrity import all_finite
from base.patterns import NMPattern, check_sparsity
from base.resume import ResumeState
from surgeon import structures
from surgeon.baselines.sparsegpt import prune_sparsegpt
from surgeon.calibrate import FisherKind, input_factors, kfac_factors
from surgeon.curvature.kfac import DampedKron, KronFactor, LazyDamped
from surgeon.driver import PruneReport
from surgeon.prune.costs import element_costs
from surgeon.prune.threshold import (
    GlobalThreshold,
    global_mask,
    global_threshold,
    linear_schedule,
    per_layer_fraction_mask,
)
from surgeon.prune.update import Correlation, update_masked
from surgeon.recover import RecoverConfig
from surgeon.sds import SDSConfig
from surgeon.structures import GroupCost, Scoring

log = logging.getLogger(__name__)

Allocation = Literal["global", "uniform"]
RowSolver = Literal["sparsegpt", "exact"]
CHECKPOINT_VERSION = 3  # 2: progress.json binds the source, calibration and settings; state per shot; 3: base.resume
PROGRESS = "progress.json"


@dataclass(frozen=True)
class Remaining:
    """Structured target: this fraction of the decoder-linear weights remains."""

    fraction: float

    def __str__(self) -> str:
        return f"{self.fraction:.4g} remaining"


Target = float | NMPattern | Remaining


@dataclass
class SurgeonConfig:
    """Settings of one LLM Surgeon run.

    One target: ``sparsity`` (unstructured), ``pattern`` (N:M) or ``structured`` (remaining
    fraction of decoder-linear weights); ``structured`` with ``pattern`` runs the structured shots
    first, then N:M on what remains.
    """

    sparsity: float | None = None  # unstructured: fraction of decoder-linear weights removed
    pattern: NMPattern | None = None  # semi-structured N:M
    structured: float | None = None  # structured: remaining fraction of decoder-linear weights
    shots: int = 3
    allocation: Allocation = "global"  # compare costs across layers, or the same fraction per linear
    max_layer_sparsity: float = 0.9  # the per-layer floor: no linear loses more than this fraction
    lam_A: float = 0.01
    lam_G: float | None = None  # default 0.1 for unstructured and N:M, 0.01 structured (ALGORITHMS.md)
    correlation: Correlation = "joint"  # exact OBS update of each linear's whole mask (2:4: 76.4 vs 104.9 with "rows")
    fisher: FisherKind = "empirical"
    batch_size: int = 4
    scoring: Scoring = "surgeon"  # "magnitude" / "wanda": structured baselines on the same groups
    row_solver: RowSolver = "sparsegpt"  # per-row OBS updates: SparseGPT's fast sweep, or exact solves
    group_cost: GroupCost = "output"  # structured: output side only (measured best), or the sum of members
    kfac_windows: int | None = None  # backward passes (G) on the first this many windows; A on all, forward only
    refine: SDSConfig | None = None  # SDS after the shots (unstructured and N:M; surgeon.api.prune_ runs it)
    between_shots: RecoverConfig | None = None  # low-rank distillation between shots (surgeon.api.prune_ runs it)

    def __post_init__(self) -> None:
        if self.refine is not None and self.structured is not None:
            raise SurgeonError("SDS refinement works on unstructured and N:M targets, not structured ones")
        if self.scoring != "surgeon" and (self.structured is None or self.pattern is not None):
            raise SurgeonError("magnitude and Wanda scores on coupled groups need a structured target alone")
        given = [x is not None for x in (self.sparsity, self.pattern, self.structured)]
        if sum(given) != 1 and not (self.structured is not None and self.pattern is not None and self.sparsity is None):
            raise SurgeonError(
                "LLM Surgeon needs exactly one target: a sparsity, an N:M pattern, or a structured "
                "remaining fraction (structured may be combined with N:M)"
            )
        if self.sparsity is not None:
            check_sparsity(self.sparsity)
        if self.structured is not None and not 0.0 < self.structured <= 1.0:
            raise SurgeonError(f"structured remaining fraction must be in (0, 1], got {self.structured}")
        if self.shots < 1:
            raise SurgeonError(f"shots must be at least 1, got {self.shots}")
        if self.kfac_windows is not None and self.kfac_windows < 1:
            raise SurgeonError(f"K-FAC windows must be at least 1, got {self.kfac_windows}")
        if self.sparsity is not None and self.allocation == "global" and self.sparsity > self.max_layer_sparsity:
            raise SurgeonError(
                f"sparsity {self.sparsity} exceeds the per-layer ceiling {self.max_layer_sparsity}"
            )

    def damping_G(self, target: Target) -> float:
        if self.lam_G is not None:
            return self.lam_G
        return 0.01 if isinstance(target, Remaining) else 0.1

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pattern"] = str(self.pattern) if self.pattern else None
        for key in ("refine", "between_shots"):  # absent when unused: older checkpoints and reports compare equal
            if d[key] is None:
                d.pop(key)
        return d

    def shot_targets(self) -> list[Target]:
        """The target after each shot: linear schedules of remaining size, sparsity, or zeros per block."""
        targets: list[Target] = []
        if self.structured is not None:
            targets += [Remaining(f) for f in linear_schedule(self.structured, self.shots)]
        if self.pattern is not None:
            n = self.pattern.n_zero
            zeros = sorted({max(1, round(n * k / self.shots)) for k in range(1, self.shots + 1)})
            targets += [NMPattern(z, self.pattern.block) for z in zeros]
        if self.sparsity is not None:
            targets += [self.sparsity * k / self.shots for k in range(1, self.shots + 1)]
        return targets


def prune_surgeon_(
    model: nn.Module,
    adapter: Adapter,
    windows: torch.Tensor,
    cfg: SurgeonConfig,
    *,
    checkpoint_dir: Path | None = None,
    binding: dict | None = None,
    progress: bool = True,
    between_shots: Callable[[int, dict[str, torch.Tensor]], dict] | None = None,
) -> PruneReport:
    """Prune ``model`` in place with LLM Surgeon; returns the report (allocation per layer, shots).

    Args:
        windows: calibration token ids ``[N, T]``.
        checkpoint_dir: if given, the state after every shot is saved there, and a run with the
            same config, linears and calibration windows resumes after the last completed shot
            instead of starting over; anything else is refused naming the difference.
        binding: more that the checkpoint must match (the caller's source identity, seed, ...).
        between_shots: called after every shot but the last with the shot's index and the kept
            masks (the interleaved low-rank update); what it returns joins that shot's record.
    """
    linears = adapter.decoder_linears(model)
    if cfg.structured is not None:
        structures.check_supported(model, adapter)
    if cfg.pattern is not None:
        for name, m in linears.items():
            cfg.pattern.check_shape(m.in_features, name)
    start = time.perf_counter()
    report = PruneReport(config=cfg.to_dict())
    keep = {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in linears.items()}
    targets = cfg.shot_targets()
    first, state = 0, None
    if checkpoint_dir is not None:  # rank 0 reads the checkpoint and hands the state to every rank
        if is_main():
            state, first, report.shots = _resume(checkpoint_dir, binding_of(cfg, linears, windows, binding), linears,
                                                 keep)
        first, report.shots = broadcast_json(0, [first, report.shots])
        if first:
            _share(linears, keep, dict.fromkeys(linears, 0))
    for shot in range(first, len(targets)):
        target = targets[shot]
        t0 = time.perf_counter()
        if cfg.scoring != "surgeon":  # baselines on the same coupled groups: scores, no update
            A = input_factors(model, adapter, windows, batch_size=cfg.batch_size) if cfg.scoring == "wanda" else None
            t_curv = time.perf_counter() - t0
            _structured_step(model, adapter, target, keep, cfg, A=A)  # type: ignore[arg-type]
        else:
            split = cfg.kfac_windows is not None and cfg.kfac_windows < windows.shape[0]
            names = factor_names(adapter, target, cfg)
            factors = kfac_factors(model, adapter, windows[: cfg.kfac_windows] if split else windows,
                                   batch_size=cfg.batch_size, fisher=cfg.fisher, progress=progress, names=names)
            if split:  # A is cheap (forward passes only): estimate it from every window
                A_all = input_factors(model, adapter, windows, batch_size=cfg.batch_size, progress=progress,
                                      names=names)
                factors = {name: KronFactor(A_all[name], f.G) for name, f in factors.items()}
            t_curv = time.perf_counter() - t0
            damped = LazyDamped(factors, cfg.lam_A, cfg.damping_G(target))
            if isinstance(target, Remaining):
                _structured_step(model, adapter, target, keep, cfg, damped=damped)
            else:
                _element_step(linears, target, damped, keep, cfg)
            del damped, factors
        removed = sum(int((~k).sum()) for k in keep.values()) / sum(k.numel() for k in keep.values())
        report.shots.append({
            "shot": shot + 1, "target": target if isinstance(target, float) else str(target),
            "sparsity": removed, "curvature_seconds": round(t_curv, 1),
            "seconds": round(time.perf_counter() - t0, 1),
        })
        log.info("shot %d/%d: sparsity %.2f%% (%.0f s)", shot + 1, len(targets), 100 * removed,
                 time.perf_counter() - t0)
        if between_shots is not None and shot + 1 < len(targets):
            report.shots[-1]["between_shots"] = between_shots(shot, keep)
        if state is not None:
            _save_checkpoint(state, shot + 1, report.shots, linears, keep)
    for name, m in linears.items():
        report.record(name, m)
    if cfg.structured is not None:
        report.removal = structures.removal_plan(model, adapter, keep).to_dict()
    report.seconds = time.perf_counter() - start
    return report


def factor_names(adapter: Adapter, target: Target, cfg: SurgeonConfig) -> list[str]:
    """The linears (names in a layer) whose K-FAC factors a shot reads: with structured output-side costs
    (``group_cost="output"``) only o and down are scored and moved, so only their factors are formed (on the
    default model, 55 of the 150 GFLOP of a layer's moments per shot); else every linear's."""
    if output_side(target, cfg):
        return [adapter.head_cols[0], adapter.channel_cols[0]]
    return list(adapter.linear_names)


def output_side(target: Target, cfg: SurgeonConfig) -> bool:
    """A structured shot with output-side costs: o's and down's factors alone are used (and moved)."""
    return isinstance(target, Remaining) and cfg.group_cost == "output"


def is_local(target: Target, cfg: SurgeonConfig) -> bool:
    """Whether each layer's removals follow from its own costs (N:M, uniform allocation) rather than
    from a comparison across layers (global allocation)."""
    return isinstance(target, NMPattern) or cfg.allocation == "uniform"


def element_costs_of(
    linears: Mapping[str, nn.Linear], damped: Mapping[str, DampedKron], keep: Mapping[str, torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, costs [d_out, d_in])`` of every linear; removed weights cost -1 (they stay removed)."""
    for name, m in linears.items():
        c = element_costs(m.weight.detach().double(), damped[name].A_inv, damped[name].G_inv)
        yield name, torch.where(keep[name], c, -1.0)


def _element_step(
    linears: dict[str, nn.Linear], target: float | NMPattern, damped: Mapping[str, DampedKron],
    keep: dict[str, torch.Tensor], cfg: SurgeonConfig,
) -> None:
    """Remove the cheapest weights (globally, per linear, or per N:M block) with correlated updates.

    Each linear's costs and update are computed by its owner (:func:`surgeon_cost`); global
    allocation first sends every linear's costs to every rank.
    """
    owners = assign({n: surgeon_cost(m) for n, m in linears.items()})
    mine = {n: m for n, m in linears.items() if owners[n] == rank()}
    cut = None
    if not is_local(target, cfg):  # compared across all linears
        costs = dict(element_costs_of(mine, damped, keep))
        costs = {n: costs.get(n, torch.empty(m.weight.shape, dtype=torch.float64, device=m.weight.device))
                 for n, m in linears.items()}
        share({n: [c] for n, c in costs.items()}, owners)
        cut = global_threshold(costs.items, {n: c.numel() for n, c in costs.items()}, target,  # type: ignore[arg-type]
                               cfg.max_layer_sparsity)
        del costs
    element_prune_(mine, target, damped, keep, cfg, cut)
    _share(linears, keep, owners)


def element_prune_(
    linears: Mapping[str, nn.Linear], target: float | NMPattern, damped: Mapping[str, DampedKron],
    keep: dict[str, torch.Tensor], cfg: SurgeonConfig, cut: GlobalThreshold | None = None,
) -> None:
    """Choose the removals of ``linears`` (one layer's, one rank's or all) and apply their correlated
    updates, in place.

    ``cut``: the global allocation's threshold (:func:`surgeon.prune.threshold.global_threshold`),
    None for N:M and uniform targets, which each linear decides alone.
    """
    if isinstance(target, NMPattern) and cfg.row_solver == "sparsegpt":
        # N:M: ``G`` scales every weight of a row alike, so K-FAC's element costs rank a row's
        # blocks exactly as OBS with ``A`` does; choosing each block's zeros adaptively inside
        # SparseGPT's sweep (from weights already updated for the blocks to their left) is much
        # better than choosing them all at once (2:4 on the default model: 78.5 vs 124 perplexity).
        # ``G`` still correlates the rows' updates.
        with torch.no_grad():
            for name, m in linears.items():
                d, W = damped[name], m.weight.double()
                W_rows, k = prune_sparsegpt(W, d.A, 0, target, percdamp=0.0, allowed=keep[name])
                W = update_masked(W, d.A_inv, d.G_inv, k, cfg.correlation, U=W - W_rows, A=d.A, G=d.G)
                _store(m, W, name)
                keep[name] = k
        return
    with torch.no_grad():
        for name, c in element_costs_of(linears, damped, keep):
            if isinstance(target, NMPattern):
                new = target.mask_from_scores(c)
            elif cut is not None:
                new = global_mask(c, name, cut)
            else:
                new = per_layer_fraction_mask(c, target)
            del c
            m, d = linears[name], damped[name]
            k = new & keep[name]
            W = m.weight.double()
            U = None
            if cfg.row_solver == "sparsegpt":
                # SparseGPT's column sweep with this mask fixed: each row's OBS update in
                # O(d_in^3) for the whole matrix instead of O(d_out |Q|^3) for exact per-row solves.
                W_rows, _ = prune_sparsegpt(W, d.A, 0, 0.0, keep_mask=k, percdamp=0.0)
                U = W - W_rows
            W = update_masked(W, d.A_inv, d.G_inv, k, cfg.correlation, U=U, A=d.A, G=d.G)
            _store(m, W, name)
            keep[name] = k


def surgeon_cost(m: nn.Linear) -> float:
    """Estimated work for one linear in a shot, to split linears across ranks: the two float64
    inverses (``d_in^3 + d_out^3``) and the joint update's products (``d_out d_in (d_in + d_out)``)."""
    d_out, d_in = (float(x) for x in m.weight.shape)
    return d_in**3 + d_out**3 + d_out * d_in * (d_in + d_out)


def _share(linears: Mapping[str, nn.Linear], keep: dict[str, torch.Tensor], owners: Mapping[str, int]) -> None:
    """Every linear's weights and mask from the rank that computed them to every rank (no-op with one process)."""
    share({n: [m.weight.data, keep[n]] for n, m in linears.items()}, owners)


def _store(m: nn.Linear, W: torch.Tensor, name: str) -> None:
    if not all_finite(W):
        raise FloatingPointError(f"non-finite weights after the update of {name}")
    m.weight.copy_(W.to(m.weight.dtype))


def structured_budget(linears: Mapping[str, nn.Linear], target: Remaining) -> int:
    """Decoder-linear weights a structured shot removes in all (shapes only: works on the meta device)."""
    return round((1.0 - target.fraction) * sum(m.weight.numel() for m in linears.values()))


def layer_candidates(
    model: nn.Module, adapter: Adapter, i: int, keep: dict[str, torch.Tensor], cfg: SurgeonConfig,
    damped: Mapping[str, DampedKron] | None = None, A: Mapping[str, torch.Tensor] | None = None,
    costs: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[structures.Candidate]:
    """Layer ``i``'s coupled groups that may still go, with their costs (cheapest channels first).

    ``costs``: the layer's ``(channel, head)`` costs when already computed (by another rank), else
    :func:`surgeon.structures.group_costs` from ``damped`` (LLM Surgeon) or ``A`` (Wanda scores).
    """
    inter = adapter.linear(adapter.decoder_layers(model)[i], adapter.channel_rows[0]).out_features
    channel_cost, head_cost = costs if costs is not None else structures.group_costs(
        model, adapter, i, cfg.scoring, damped, A, cfg.group_cost)  # type: ignore[arg-type]
    return structures.layer_candidates(model, adapter, i, channel_cost, head_cost, keep,
                                       min_channels=max(1, inter // 20))


def uniform_choice(found: list[structures.Candidate], budget: int, n_layers: int) -> list[structures.Candidate]:
    """``uniform``: the same number of a layer's cheapest MLP channels in every layer, no heads."""
    channels = [c for c in found if c.kind == "channel"]  # cheapest first
    per_layer = -(-budget // (n_layers * channels[0].size)) if channels else 0
    if per_layer > len(channels):
        raise SurgeonError("structured target cannot be reached with MLP channels alone under the floors")
    return channels[:per_layer]


def _structured_step(
    model: nn.Module, adapter: Adapter, target: Remaining, keep: dict[str, torch.Tensor], cfg: SurgeonConfig,
    damped: Mapping[str, DampedKron] | None = None, A: dict[str, torch.Tensor] | None = None,
) -> None:
    """Remove the cheapest coupled groups (MLP channels, head slices).

    ``global``: candidates of all layers compete by cost per weight. ``uniform``: every layer loses
    the same number of MLP channels and no heads (the reference Wanda-style channel baseline).
    """
    linears = adapter.decoder_linears(model)
    budget = structured_budget(linears, target)
    layers = adapter.decoder_layers(model)
    chosen: list[structures.Candidate] = []
    candidates: list[structures.Candidate] = []
    # Each layer's group costs (and below, its updates) are computed by one rank and shared.
    in_layer = [{n: m for n, m in linears.items() if n.startswith(f"{adapter.layers}.{i}.")} for i in range(len(layers))]
    owners = assign({str(i): sum(surgeon_cost(m) for m in ls.values()) for i, ls in enumerate(in_layer)})
    n_heads = adapter.head_layout(model.config)[0]
    costs = {}
    for i, layer in enumerate(layers):
        lead = adapter.linear(layer, adapter.channel_rows[0])
        empty = {"dtype": torch.float64, "device": lead.weight.device}  # where the owner's costs are
        costs[str(i)] = (structures.group_costs(model, adapter, i, cfg.scoring, damped, A, cfg.group_cost)
                         if owners[str(i)] == rank() else
                         (torch.empty(lead.out_features, **empty), torch.empty(n_heads, **empty)))
    share(costs, owners)
    for i in range(len(layers)):
        found = layer_candidates(model, adapter, i, keep, cfg, costs=costs[str(i)])
        if cfg.allocation == "uniform":
            chosen += uniform_choice(found, budget, len(layers))
        candidates += found
    if cfg.allocation == "global":
        chosen = structures.select(candidates, budget)
    structures.apply_(model, adapter, [c for c in chosen if owners[str(c.layer)] == rank()],
                      damped if cfg.scoring == "surgeon" else None, keep, cfg.group_cost)
    changed = sorted({c.layer for c in chosen})
    _share({n: m for i in changed for n, m in in_layer[i].items()}, keep,
           {n: owners[str(i)] for i in changed for n in in_layer[i]})


def binding_of(cfg: SurgeonConfig, linears: dict[str, nn.Linear], windows: torch.Tensor,
               extra: dict | None = None) -> dict:
    """What a checkpoint's shots depend on (:class:`base.resume.ResumeState`): the config, the linears'
    shapes and dtype, the calibration windows (a digest of their tokens), and the caller's ``extra``
    (source identity, seed, ...)."""
    tokens = windows.detach().to("cpu", torch.int64).contiguous()
    return {
        "config": cfg.to_dict(),
        "linears": {n: [*m.weight.shape, dtype_name(m.weight.dtype)] for n, m in linears.items()},
        "calibration windows": [list(tokens.shape), hashlib.sha256(tokens.numpy().tobytes()).hexdigest()],
        **(extra or {}),
    }


def _save_checkpoint(
    state: ResumeState, shots_done: int, shots: list[dict], linears: dict[str, nn.Linear],
    keep: dict[str, torch.Tensor],
) -> None:
    """Write weights and masks of this shot (a new piece), then ``progress.json`` naming it; the older
    piece is removed after that, so a kill at any point leaves a progress file and the state it names."""
    tensors = {f"{n}.weight": m.weight for n, m in linears.items()}
    tensors.update({f"{n}.keep": k.to(torch.uint8) for n, k in keep.items()})
    name = f"state-{shots_done}.safetensors"
    state.forget("state-*")
    state.put_tensors(name, tensors)
    state.save(shots_done=shots_done, shots=shots, state=name)


def _resume(
    directory: Path, binding: dict, linears: dict[str, nn.Linear], keep: dict[str, torch.Tensor]
) -> tuple[ResumeState, int, list[dict]]:
    """Open the checkpoint in ``directory`` and restore its last finished shot, if it was made with the
    same ``binding``; anything else is one line naming what differs, before anything is loaded."""
    state = ResumeState.open(directory, PROGRESS, CHECKPOINT_VERSION, binding, pieces="state-*.safetensors")
    if not state.resumed:
        return state, 0, []
    try:
        saved = state.tensors(str(state.data["state"]))
        shots_done, shots = int(state.data["shots_done"]), list(state.data["shots"])
        restored = {name: (saved[f"{name}.weight"], saved[f"{name}.keep"].bool()) for name in linears}
    except Exception as exc:  # a damaged checkpoint must not be half-applied
        raise SurgeonError(f"cannot resume from {directory}: {type(exc).__name__}: {exc}") from None
    with torch.no_grad():
        for name, m in linears.items():
            m.weight.copy_(restored[name][0])
            keep[name] = restored[name][1]
    log.info("resuming after shot %d from %s", shots_done, directory)
    return state, shots_done, shots
